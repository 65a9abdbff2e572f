"""``configure_telemetry``: one call that installs OTLP/HTTP export for users with no setup of their own.

The library itself never installs a provider; this helper does only when called.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError, MissingExtra
from ..urls import without_password
from .safety import log


@dataclass
class Tally:
    """What the exporters failed to deliver (the OTel SDK's flush and shutdown say ``True`` regardless):
    spans, and metric exports, counted as they fail."""

    spans: int = 0
    metric_exports: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, exporter: Any, what: str) -> Any:
        """``exporter``, its ``export`` counting into ``what`` the items of each batch it did not
        deliver (``spans``: the spans; ``metric_exports``: one per export)."""
        export = exporter.export

        def counted(batch: Any, *args: Any, **kwargs: Any) -> Any:
            delivered = False
            try:
                result = export(batch, *args, **kwargs)
                delivered = getattr(result, "name", "") == "SUCCESS"
                return result
            finally:
                if not delivered:
                    with self._lock:
                        setattr(self, what, getattr(self, what) + (len(batch) if what == "spans" else 1))

        exporter.export = counted
        return exporter

    def taken(self) -> tuple[int, int]:
        """The failures counted since the last call, reset."""
        with self._lock:
            failed, self.spans, self.metric_exports = (self.spans, self.metric_exports), 0, 0
        return failed


@dataclass
class TelemetryHandle:
    tracer_provider: Any
    meter_provider: Any | None
    exit_timeout_ms: int = 10_000  # how long the interpreter's exit waits for the export (:meth:`shutdown`)
    tally: Tally = field(default_factory=Tally)  # what the exporters failed to deliver, since the last flush
    _shut: bool | None = field(default=None, init=False, repr=False)  # what shutdown() said, once it ran

    def force_flush(self, timeout_ms: int = 10_000) -> bool:
        """Export what is pending; ``False`` if not all of it was exported within ``timeout_ms`` (an
        exporter retrying a collector that refuses or hangs goes on in the background: the OTel SDK's
        flush waited its retries out, 15-25 s for a 2 s timeout), or if spans or metrics were dropped
        since the last flush (the collector refused them or could not be reached; logged,
        ``telemetry_export_failed``)."""
        in_time = self._within(timeout_ms, "flush", lambda provider: provider.force_flush(timeout_ms))
        return self._delivered() and in_time

    def shutdown(self, timeout_ms: int = 10_000) -> bool:
        """Export what is pending and stop the exporters (once, a later call saying what the first
        said; also at the interpreter's exit, bounded by ``exit_timeout_ms``); ``False`` if exports
        failed since the last flush (logged, ``telemetry_export_failed``) or if that did not end within
        ``timeout_ms``: the rest is dropped when the process exits (logged,
        ``telemetry_shutdown_timed_out``). The OTel SDK's own shutdown exports its queue batch by batch,
        each waiting the exporter's timeout when the collector hangs: 20 s and more for a few thousand
        spans."""
        if self._shut is not None:
            return self._shut
        self._shut = False
        if self._within(timeout_ms, "shutdown", lambda provider: provider.shutdown() is not False):
            self._shut = self._delivered()
            return self._shut
        self._delivered()
        log.warning("telemetry_shutdown_timed_out", timeout_ms=timeout_ms,
                    why="the collector did not take the pending spans and metrics in time: dropped at exit")
        return False

    def _delivered(self) -> bool:
        """Whether every export since the last check reached the collector; if not, says what was dropped."""
        spans, metric_exports = self.tally.taken()
        if spans or metric_exports:
            log.warning("telemetry_export_failed", dropped_spans=spans, failed_metric_exports=metric_exports,
                        why="the collector refused them or could not be reached (see the OTel SDK's log)")
        return not (spans or metric_exports)

    def _within(self, timeout_ms: int, what: str, act: Callable[[Any], object]) -> bool:
        """``act`` on each provider in a thread of its own; whether all of it ended within ``timeout_ms``
        and said so (a flush's ``True``)."""
        done: list[bool] = []

        def run() -> None:
            ok = bool(act(self.tracer_provider))
            if self.meter_provider is not None:
                ok = bool(act(self.meter_provider)) and ok
            done.append(ok)

        worker = threading.Thread(target=run, name=f"router-middleware-telemetry-{what}", daemon=True)
        worker.start()
        worker.join(timeout_ms / 1000)
        return bool(done) and done[0]

    def _at_exit(self) -> None:
        self.shutdown(self.exit_timeout_ms)


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
    Raises :class:`~router_middleware.MissingExtra` without the ``otlp`` extra, and
    :class:`~router_middleware.ConfigError` for an argument it cannot use (naming it).
    """
    _check(endpoint, headers, sample_ratio, timeout_s)
    _check_options(service_name, resource_attributes, metrics=metrics, set_global=set_global)
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

    base = collector_base(endpoint)
    resource = Resource.create({"service.name": service_name, **dict(resource_attributes or {})})
    tracer_provider = TracerProvider(resource=resource, sampler=ParentBasedTraceIdRatio(sample_ratio),
                                     shutdown_on_exit=False)  # the handle's exit hook bounds it
    exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=dict(headers or {}), timeout=timeout_s)
    tally = Tally()
    tracer_provider.add_span_processor(BatchSpanProcessor(tally.count(exporter, "spans"),
                                                          export_timeout_millis=int(timeout_s * 1000)))
    meter_provider = None
    if metrics:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        reader = PeriodicExportingMetricReader(tally.count(
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=dict(headers or {}), timeout=timeout_s),
            "metric_exports"))
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            metrics_api.set_meter_provider(meter_provider)
    handle = TelemetryHandle(tracer_provider, meter_provider, exit_timeout_ms=int(timeout_s * 1000), tally=tally)
    atexit.register(handle._at_exit)
    return handle


_SIGNAL_PATHS = ("/v1/traces", "/v1/metrics")


def collector_base(endpoint: str) -> str:
    """The collector's base URL, to which ``/v1/traces`` and ``/v1/metrics`` are added: ``endpoint``
    without a trailing slash, or without the signal's path it was given with (Phoenix prints its
    traces URL, ``http://127.0.0.1:6006/v1/traces``: pasted, it was sent ``/v1/traces/v1/traces``)."""
    base = endpoint.rstrip("/")
    for path in _SIGNAL_PATHS:
        if base.lower().endswith(path):
            return base[: -len(path)]
    return base


def _check(endpoint: object, headers: object, sample_ratio: object, timeout_s: object) -> None:
    """:class:`ConfigError` naming the first argument of :func:`configure_telemetry` it cannot use."""
    if not isinstance(endpoint, str) or not endpoint.lower().startswith(("http://", "https://")) \
            or not endpoint.split("://", 1)[1].strip("/"):
        raise ConfigError(f"endpoint: expected the collector's http(s) URL (http://127.0.0.1:4318), got {endpoint!r}")
    problem = _url_problem(endpoint)
    if problem:
        raise ConfigError(f"endpoint {without_password(endpoint)!r}: {problem} (expected a URL such as "
                          "http://127.0.0.1:4318)")
    if headers is not None and not (isinstance(headers, Mapping)
                                    and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
        raise ConfigError(f"headers: expected a mapping of header names to strings, got {headers!r:.80}")
    if isinstance(sample_ratio, bool) or not isinstance(sample_ratio, int | float) or not 0 <= sample_ratio <= 1:
        raise ConfigError(f"sample_ratio: expected a number from 0 to 1, got {sample_ratio!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not 0 < timeout_s < float("inf"):
        raise ConfigError(f"timeout_s: expected a number of seconds above 0, got {timeout_s!r}")


def _url_problem(endpoint: str) -> str | None:
    """What makes ``endpoint`` a URL no export can reach (every export failed on it), or ``None``."""
    parts = urlsplit(endpoint)
    if not parts.hostname or any(c.isspace() for c in parts.netloc):
        return "no host name"
    try:
        parts.port  # noqa: B018 - a port out of range, or not a number, raises
    except ValueError as exc:
        return str(exc)
    return None


def _check_options(service_name: object, attributes: object, **switches: object) -> None:
    """:class:`ConfigError` naming ``service_name`` or ``resource_attributes`` when it is no resource's,
    or a switch that is no bool (``metrics="no"`` turned metrics on)."""
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected True or False, got {value!r}")
    if not isinstance(service_name, str) or not service_name.strip():
        raise ConfigError(f"service_name: expected a non-empty string, got {service_name!r}")
    if attributes is None:
        return
    if not isinstance(attributes, Mapping) or not all(isinstance(k, str) and _attribute(v)
                                                      for k, v in attributes.items()):
        raise ConfigError("resource_attributes: expected a mapping of names to strings, numbers or booleans (or "
                          f"lists of them), got {attributes!r:.80}")


def _attribute(value: object) -> bool:
    """Is ``value`` an OpenTelemetry attribute value: a string, number or boolean, or a list of them?"""
    scalar = (str, bool, int, float)
    return isinstance(value, scalar) or (isinstance(value, list | tuple) and all(isinstance(v, scalar) for v in value))
