"""The proxy's callback: ``litellm_settings.callbacks: router_hook.handler`` in config.yaml.

Environment:
- ROUTER_MIDDLEWARE_CONFIG: the pipeline config (default: router.yaml beside this file);
- ROUTER_MIDDLEWARE_OTLP_ENDPOINT: export spans over OTLP/HTTP there (e.g. Phoenix,
  http://127.0.0.1:6006), under the project ROUTER_MIDDLEWARE_PROJECT (default: coding-agent).
"""

from __future__ import annotations

import os
from pathlib import Path

from router_middleware import Pipeline, configure_telemetry
from router_middleware.litellm import RouterLogger

CONFIG = os.environ.get("ROUTER_MIDDLEWARE_CONFIG") or str(Path(__file__).with_name("router.yaml"))
if os.environ.get("ROUTER_MIDDLEWARE_OTLP_ENDPOINT"):
    project = os.environ.get("ROUTER_MIDDLEWARE_PROJECT", "coding-agent")
    configure_telemetry(os.environ["ROUTER_MIDDLEWARE_OTLP_ENDPOINT"], service_name="litellm-proxy", metrics=False,
                        resource_attributes={"openinference.project.name": project})
handler = RouterLogger(Pipeline.from_config(CONFIG), proxy=True)
