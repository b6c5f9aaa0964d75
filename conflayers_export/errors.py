"""Typed errors of the exporter. The CLI turns each into one red line and exit code 1."""

from __future__ import annotations

from conflayers_runtime.errors import (  # noqa: F401  (re-exported: one place to import errors from)
    ConflayersError,
    CostTableError,
    DeviceError,
    GenerationError,
    ManifestError,
    SessionOptionError,
    SkipSetError,
)


class ModelSourceError(ConflayersError):
    """A --model value cannot be resolved: unknown name, missing file, package not installed, bad hash."""


class UnsupportedArchitectureError(ConflayersError):
    """The model's architecture has no adapter in the registry."""


class CalibrationError(ConflayersError):
    """Calibration input or settings are invalid (data file, skip ratio, output folder)."""


class BenchError(ConflayersError):
    """bench was asked for something this run does not have (an engine pattern that matches none)."""


class BuildError(ConflayersError):
    """Build settings do not fit the model: the dtype, --max-seq-len, or a draft's weight
    precision or vocabulary."""
