"""Environment defaults applied before litellm is imported."""

from __future__ import annotations

import os
import sys
import warnings


def prepare_litellm_env() -> None:
    """Keep litellm offline at import: use its bundled price map unless the user opted out.

    Without ``LITELLM_LOCAL_MODEL_COST_MAP=True`` ``import litellm`` fetches a price map from the
    internet and stalls for seconds when offline. Set ``ROUTER_MIDDLEWARE_REMOTE_COST_MAP=1`` to keep
    litellm's default behaviour.
    """
    if remote_cost_map():
        return
    if "LITELLM_LOCAL_MODEL_COST_MAP" not in os.environ and "litellm" in sys.modules:
        warnings.warn(
            "litellm was imported before router_middleware without LITELLM_LOCAL_MODEL_COST_MAP=True, so it "
            "fetches its price map from the internet (seconds of retries offline). router-middleware prices "
            "calls with litellm's bundled map anyway; import router_middleware first, or set "
            "LITELLM_LOCAL_MODEL_COST_MAP=True in the environment.", RuntimeWarning, stacklevel=3)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def remote_cost_map() -> bool:
    """Whether the user asked for litellm's remote price map (``ROUTER_MIDDLEWARE_REMOTE_COST_MAP=1``)."""
    return os.environ.get("ROUTER_MIDDLEWARE_REMOTE_COST_MAP", "") in ("1", "true", "True")
