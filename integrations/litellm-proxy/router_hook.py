"""The proxy's callback: ``litellm_settings.callbacks: router_hook.handler`` in config.yaml.

Environment:
- ROUTER_MIDDLEWARE_CONFIG: the pipeline config (default: router.yaml beside this file);
- ROUTER_MIDDLEWARE_OTLP_ENDPOINT: export spans over OTLP/HTTP there (e.g. Phoenix,
  http://127.0.0.1:6006), under the project ROUTER_MIDDLEWARE_PROJECT (default: coding-agent);
- ROUTER_MIDDLEWARE_LOG_LEVEL: write router-middleware's events at this level and above as JSON lines
  to stderr (``INFO``: a line per call; unset: warnings and errors only, through the logging module).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from router_middleware import Pipeline, configure_logging, configure_telemetry
from router_middleware.litellm import RouterLogger

CONFIG = os.environ.get("ROUTER_MIDDLEWARE_CONFIG") or str(Path(__file__).with_name("router.yaml"))
if os.environ.get("ROUTER_MIDDLEWARE_OTLP_ENDPOINT"):
    project = os.environ.get("ROUTER_MIDDLEWARE_PROJECT", "coding-agent")
    configure_telemetry(os.environ["ROUTER_MIDDLEWARE_OTLP_ENDPOINT"], service_name="litellm-proxy", metrics=False,
                        resource_attributes={"openinference.project.name": project})
if level := os.environ.get("ROUTER_MIDDLEWARE_LOG_LEVEL"):
    levels = logging.getLevelNamesMapping()
    if level.upper() not in levels:
        raise ValueError(f"ROUTER_MIDDLEWARE_LOG_LEVEL={level!r} is no log level: one of {', '.join(levels)}")
    configure_logging(json=True, level=levels[level.upper()])  # structlog's, for the whole proxy process
handler = RouterLogger(Pipeline.from_config(CONFIG), proxy=True)
