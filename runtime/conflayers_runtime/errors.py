"""Typed errors of conflayers: every failure a user can cause names the problem and the fix.

The exporter package derives its own errors from :class:`ConflayersError`, so a caller can catch
one base class for both packages.
"""

from __future__ import annotations


class ConflayersError(Exception):
    """Base class of every error raised on purpose by conflayers."""


class ManifestError(ConflayersError):
    """A manifest is missing, malformed, or of a schema version this runtime cannot read."""


class DeviceError(ConflayersError):
    """A device cannot run what was asked of it: an unknown device name, an ONNX Runtime build
    without its execution provider, or a graph, dtype or weights mode that it does not run."""


class SessionOptionError(ConflayersError, ValueError):
    """Options for opening an artifact's sessions are unknown or contradict each other."""


class CostTableError(ConflayersError):
    """A cost table is missing, malformed or of another version, cannot price a draft, or cannot
    be measured on the given artifact."""


class GenerationError(ConflayersError):
    """Generation settings or inputs are invalid (empty prompt, bad sampling settings...)."""


class SkipSetError(ConflayersError, ValueError):
    """A skip set names layers that cannot be skipped (the first, the last, or out of range)."""
