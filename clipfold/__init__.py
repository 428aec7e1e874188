"""clipfold: compile CLIP models and their adaptations into verified engines, and run them.

Importing this package is cheap and never imports torch: the runtime (``Engine``) and the error
family are loaded on first use, and ``compile_bundle`` imports the compile stack (torch,
open_clip) only when called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Engine", "compile_bundle", "CompileConfig", "QuantConfig", "GateConfig", "ClipfoldError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from clipfold.runtime import Engine

        return Engine
    if name in ("compile_bundle", "CompileConfig"):
        from clipfold.compile import pipeline

        return getattr(pipeline, name)
    if name in ("QuantConfig", "GateConfig"):
        import clipfold.compile.precision.config as precision

        return getattr(precision, name)
    if name == "ClipfoldError":
        from clipfold.errors import ClipfoldError

        return ClipfoldError
    raise AttributeError(f"module 'clipfold' has no attribute {name!r}")
