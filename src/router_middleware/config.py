"""Configuration: pydantic models, loaded from YAML, JSON or a dict. Unknown fields are errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

PER_MILLION = 1_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelOverride(_Strict):
    """Facts about one model that win over litellm's catalog. Prices in USD per million tokens."""

    input_per_mtok: float | None = Field(default=None, ge=0)
    output_per_mtok: float | None = Field(default=None, ge=0)
    cache_read_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_per_mtok: float | None = Field(default=None, ge=0)
    reasoning_per_mtok: float | None = Field(default=None, ge=0)
    max_input_tokens: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)

    def as_catalog_fields(self) -> dict[str, Any]:
        prices = {
            "input": self.input_per_mtok,
            "output": self.output_per_mtok,
            "cache_read": self.cache_read_per_mtok,
            "cache_write": self.cache_write_per_mtok,
            "reasoning": self.reasoning_per_mtok,
        }
        fields: dict[str, Any] = {k: v / PER_MILLION for k, v in prices.items() if v is not None}
        if self.max_input_tokens is not None:
            fields["max_input_tokens"] = self.max_input_tokens
        if self.max_output_tokens is not None:
            fields["max_output_tokens"] = self.max_output_tokens
        return fields


class TelemetryConfig(_Strict):
    enabled: bool = True
    capture_content: bool = False


class Config(_Strict):
    """The whole configuration. ``Config()`` is a pass-through that still accounts and traces."""

    version: Literal[1] = 1
    app: str | None = None
    models: dict[str, ModelOverride] = Field(default_factory=dict)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    def catalog_overrides(self) -> dict[str, dict[str, Any]]:
        return {name: o.as_catalog_fields() for name, o in self.models.items()}


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(root)"
        lines.append(f"{source}: field '{field}': {item['msg']}")
    return "\n".join(lines)


def load_config(source: Config | Mapping[str, Any] | str | Path | None) -> Config:
    """Load and validate a config from a ``Config``, a dict, or a YAML/JSON file path."""
    if source is None:
        return Config()
    if isinstance(source, Config):
        return source
    label = "config"
    data: Any
    if isinstance(source, str | Path):
        path = Path(source)
        label = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{label}: cannot read config file ({exc.strerror})") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"{label}: not valid YAML/JSON ({exc})") from None
        data = data or {}
    else:
        data = source
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, label)) from None
