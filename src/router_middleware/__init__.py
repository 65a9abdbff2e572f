"""router-middleware: routing, context trimming, reasoning caps and exact accounting for agent calls.

Public API only; nothing heavy is imported here (litellm loads on the first call).
"""

from ._env import prepare_litellm_env

prepare_litellm_env()

from .accounting import outcome
from .catalog import Catalog, ModelInfo
from .config import Config, load_config
from .errors import (
    AnswerDiscarded,
    BudgetExceeded,
    ConfigError,
    EmptyStreamError,
    LedgerError,
    LockTimeout,
    MaxTokensError,
    MessageError,
    MissingExtra,
    MissingKeyError,
    NoRouteError,
    OutcomeUnavailable,
    PartialWrite,
    PolicyError,
    RequestError,
    RouterMiddlewareError,
    SessionFormatError,
    StoreError,
    StoreUnavailable,
    StreamLeft,
    UnknownModelError,
    UnreadableCounter,
)
from .pipeline import Pipeline
from .policies import Policy, PolicyState
from .pricing import price
from .streaming import TrackedStream
from .telemetry import Redactor, configure_logging, configure_telemetry
from .types import AgentContext, Call, Cost, Decision, Outcome, Plan, Usage
from .usage import normalize_usage

__all__ = [
    "AgentContext",
    "AnswerDiscarded",
    "BudgetExceeded",
    "Call",
    "Catalog",
    "Config",
    "ConfigError",
    "Cost",
    "Decision",
    "EmptyStreamError",
    "LedgerError",
    "MaxTokensError",
    "LockTimeout",
    "MessageError",
    "MissingExtra",
    "MissingKeyError",
    "ModelInfo",
    "NoRouteError",
    "PolicyError",
    "Outcome",
    "OutcomeUnavailable",
    "PartialWrite",
    "Pipeline",
    "Plan",
    "RequestError",
    "Policy",
    "PolicyState",
    "Redactor",
    "RouterMiddlewareError",
    "SessionFormatError",
    "StoreError",
    "StoreUnavailable",
    "StreamLeft",
    "TrackedStream",
    "UnknownModelError",
    "UnreadableCounter",
    "Usage",
    "configure_logging",
    "configure_telemetry",
    "load_config",
    "normalize_usage",
    "outcome",
    "price",
]
__version__ = "0.1.0"
