"""router-middleware: routing, context trimming, reasoning caps and exact accounting for agent calls.

Public API only; nothing heavy is imported here (litellm loads on the first call).
"""

from ._env import prepare_litellm_env

prepare_litellm_env()

from .accounting import outcome  # noqa: E402
from .catalog import Catalog, ModelInfo  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    MessageError,
    OutcomeUnavailable,
    RouterMiddlewareError,
    SessionFormatError,
)
from .pipeline import Pipeline  # noqa: E402
from .policies import Policy, PolicyState  # noqa: E402
from .pricing import price  # noqa: E402
from .streaming import TrackedStream  # noqa: E402
from .types import AgentContext, Call, Cost, Decision, Outcome, Plan, Usage  # noqa: E402
from .usage import normalize_usage  # noqa: E402

__all__ = [
    "AgentContext",
    "Call",
    "Catalog",
    "Config",
    "ConfigError",
    "Cost",
    "Decision",
    "MessageError",
    "ModelInfo",
    "Outcome",
    "OutcomeUnavailable",
    "Pipeline",
    "Plan",
    "Policy",
    "PolicyState",
    "RouterMiddlewareError",
    "SessionFormatError",
    "TrackedStream",
    "Usage",
    "load_config",
    "normalize_usage",
    "outcome",
    "price",
]
__version__ = "0.1.0"
