"""``configure_telemetry``: one call that installs OTLP/HTTP export for users with no setup of their own.

The library itself never installs a provider; this helper does only when called.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MissingExtra


@dataclass
class TelemetryHandle:
    tracer_provider: Any
    meter_provider: Any | None

    def force_flush(self, timeout_ms: int = 10_000) -> bool:
        """Export what is pending; ``False`` if not all of it was exported within ``timeout_ms`` (an
        exporter retrying a collector that refuses or hangs goes on in the background: the OTel SDK's
        flush waited its retries out, 15-25 s for a 2 s timeout)."""
        done: list[bool] = []

        def flush() -> None:
            ok = bool(self.tracer_provider.force_flush(timeout_ms))
            if self.meter_provider is not None:
                ok = bool(self.meter_provider.force_flush(timeout_ms)) and ok
            done.append(ok)

        worker = threading.Thread(target=flush, name="router-middleware-telemetry-flush", daemon=True)
        worker.start()
        worker.join(timeout_ms / 1000)
        return bool(done) and done[0]

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def configure_telemetry(
    endpoint: str = "http://127.0.0.1:4318",
    *,
    headers: Mapping[str, str] | None = None,
    service_name: str = "router-middleware",
    sample_ratio: float = 1.0,
    metrics: bool = True,
    timeout_s: float = 5.0,
    set_global: bool = True,
    resource_attributes: Mapping[str, str] | None = None,
) -> TelemetryHandle:
    """Export spans (and metrics) over OTLP/HTTP to ``endpoint`` (``/v1/traces`` and ``/v1/metrics``).

    ``resource_attributes`` are added to the resource (Phoenix files spans under
    ``openinference.project.name``). Spans go through a batch processor, so a slow or unreachable
    collector costs the calls nothing: export happens on a background thread and gives up after
    ``timeout_s``.
    Raises :class:`~router_middleware.MissingExtra` without the ``otlp`` extra.
    """
    from opentelemetry import metrics as metrics_api
    from opentelemetry import trace

    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise MissingExtra("configure_telemetry (OTLP export)", "otlp", "opentelemetry-exporter-otlp-proto-http") \
            from exc
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    base = endpoint.rstrip("/")
    resource = Resource.create({"service.name": service_name, **dict(resource_attributes or {})})
    tracer_provider = TracerProvider(resource=resource, sampler=ParentBasedTraceIdRatio(sample_ratio))
    exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=dict(headers or {}), timeout=timeout_s)
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter, export_timeout_millis=int(timeout_s * 1000)))
    meter_provider = None
    if metrics:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=dict(headers or {}), timeout=timeout_s))
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            metrics_api.set_meter_provider(meter_provider)
    return TelemetryHandle(tracer_provider, meter_provider)
