"""Environment defaults applied before litellm is imported."""

from __future__ import annotations

import os


def prepare_litellm_env() -> None:
    """Keep litellm offline at import: use its bundled price map unless the user opted out.

    Without ``LITELLM_LOCAL_MODEL_COST_MAP=True`` ``import litellm`` fetches a price map from the
    internet and stalls for seconds when offline. Set ``ROUTER_MIDDLEWARE_REMOTE_COST_MAP=1`` to keep
    litellm's default behaviour.
    """
    if os.environ.get("ROUTER_MIDDLEWARE_REMOTE_COST_MAP", "") not in ("1", "true", "True"):
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
