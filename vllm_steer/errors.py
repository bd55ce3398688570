"""Errors raised by vllm-steer. Each names the field (or file) at fault."""

from __future__ import annotations


class SteeringError(ValueError):
    """Base class; ``field`` names the offending field, e.g. ``steering.alpha``."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PackError(SteeringError):
    """A steer pack is unreadable, malformed, or does not fit the model."""


class SpecError(SteeringError):
    """A per-request steering spec is malformed or names something the engine does not have."""


class ConfigError(SteeringError):
    """The engine-level steering configuration is invalid."""
