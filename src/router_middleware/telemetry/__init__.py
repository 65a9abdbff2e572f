"""Telemetry: OpenTelemetry spans and metrics with tokens and cost, structlog events, redaction."""

from .attributes import decision_attributes, openinference_attributes, outcome_attributes, request_attributes
from .logs import add_trace_context, configure_logging
from .redaction import DEFAULT_REDACTOR, Redactor
from .safety import log, never_raises
from .setup import TelemetryHandle, configure_telemetry
from .tracing import CallTrace, TelemetrySettings

__all__ = [
    "DEFAULT_REDACTOR", "CallTrace", "Redactor", "TelemetryHandle", "TelemetrySettings", "add_trace_context",
    "configure_logging", "configure_telemetry", "decision_attributes", "log", "never_raises",
    "openinference_attributes", "outcome_attributes", "request_attributes",
]
