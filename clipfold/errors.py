"""The one exception family for user-facing failures.

Every message says what was wrong, what was expected, and, where it helps, what to do. The CLI
prints ``str(error)`` and exits non-zero without a traceback for any ``ClipfoldError``.

This module imports nothing heavy: compile, runtime and kernels all raise from it.
"""

from __future__ import annotations


class ClipfoldError(Exception):
    """Base of every error clipfold raises on purpose."""

    exit_code = 2


# --- model and checkpoint -------------------------------------------------------------------
class ModelError(ClipfoldError):
    """A model could not be loaded."""


class UnknownModelError(ModelError):
    """The model name is not in open_clip's registry."""


class CheckpointError(ModelError):
    """A checkpoint is missing, unreadable, or does not fit the architecture."""


# --- labels and prompts ---------------------------------------------------------------------
class LabelError(ClipfoldError):
    """Labels are empty, duplicated, or otherwise unusable."""


# --- export and verification ----------------------------------------------------------------
class ExportError(ClipfoldError):
    """The model could not be exported to ONNX."""


class VerificationError(ClipfoldError):
    """An exported artifact does not match the eager reference within tolerance."""

    def __init__(self, message: str, failures: list | None = None):
        super().__init__(message)
        self.failures = list(failures or [])


class GateError(VerificationError):
    """A reduced-precision variant misses the accuracy gate against fp32; it is not written."""


# --- bundles --------------------------------------------------------------------------------
class BundleError(ClipfoldError):
    """A bundle is missing, malformed, or cannot be written."""


class ChecksumError(BundleError):
    """A bundle file does not match the checksum recorded in its manifest."""


class SchemaVersionError(BundleError):
    """The bundle was written with a manifest schema this version cannot read."""


# --- images ---------------------------------------------------------------------------------
class ImageError(ClipfoldError):
    """An input image cannot be decoded or is unsafe to decode."""


class DecompressionBombError(ImageError):
    """An image declares more pixels than the configured limit."""


# --- configuration --------------------------------------------------------------------------
class ConfigError(ClipfoldError):
    """An option or argument has an invalid value."""


class BackendUnavailableError(ClipfoldError):
    """A requested backend or optional dependency is not installed."""


# --- serving --------------------------------------------------------------------------------
class EngineMismatchError(BackendUnavailableError):
    """A TensorRT engine was built for another GPU compute capability or TensorRT version."""


class RequestError(ClipfoldError):
    """A request is malformed: bad JSON, a wrong tensor shape or datatype, an unknown name."""


class QueueFullError(ClipfoldError):
    """The batcher's bounded queue is full; the caller should retry later (HTTP 503)."""


class BatcherClosedError(ClipfoldError):
    """The batcher is shut down and takes no more work."""
