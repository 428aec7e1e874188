"""clipfold: compile CLIP models and their adaptations into verified engines, and run them.

Every user-facing function and its config is a name of this package, so nothing needs a deep path:

- compile: ``compile_bundle(CompileConfig)`` (with ``QuantConfig``, ``GateConfig``),
  ``fit_adapter(FitConfig)``, ``add_head(HeadAddConfig)``, ``build_engines(EngineBuildConfig)``
  (with ``BatchProfile``), ``profile(ProfileConfig)``, ``export_triton(TritonExportConfig)``,
  ``list_models()``;
- run: ``Engine``, ``evaluate_folder``, ``build_index``, ``Index``, ``ShardedIndex``,
  ``serve(bundles, ServeConfig)``;
- ``ClipfoldError``, the one exception family of bad input.

Importing this package is cheap and never imports torch: each name is loaded on first use, and only
the compile functions and their configs import the compile stack (torch, open_clip).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it (loaded on first use)
_HOMES = {
    "compile_bundle": "clipfold.compile.pipeline",
    "CompileConfig": "clipfold.compile.config",
    "QuantConfig": "clipfold.compile.precision.config",
    "GateConfig": "clipfold.compile.precision.config",
    "fit_adapter": "clipfold.compile.adapters.fit",
    "FitConfig": "clipfold.compile.adapters.fit",
    "add_head": "clipfold.compile.heads.add",
    "HeadAddConfig": "clipfold.compile.heads.add",
    "build_engines": "clipfold.compile.tensorrt.engines",
    "EngineBuildConfig": "clipfold.compile.tensorrt.engines",
    "BatchProfile": "clipfold.compile.tensorrt.build",
    "profile": "clipfold.compile.profiling.run",
    "ProfileConfig": "clipfold.compile.profiling.run",
    "export_triton": "clipfold.compile.triton_server.repository",
    "TritonExportConfig": "clipfold.compile.triton_server.repository",
    "list_models": "clipfold.compile.stages.load",
    "Engine": "clipfold.runtime.engine",
    "evaluate_folder": "clipfold.runtime.image_folders",
    "build_index": "clipfold.runtime.retrieval.index",
    "Index": "clipfold.runtime.retrieval.index",
    "ShardedIndex": "clipfold.runtime.retrieval.index",
    "serve": "clipfold.runtime.serve.app",
    "ServeConfig": "clipfold.runtime.serve.config",
    "ClipfoldError": "clipfold.errors",
}

__all__ = [
    "BatchProfile", "ClipfoldError", "CompileConfig", "Engine", "EngineBuildConfig", "FitConfig", "GateConfig",
    "HeadAddConfig", "Index", "ProfileConfig", "QuantConfig", "ServeConfig", "ShardedIndex", "TritonExportConfig",
    "__version__", "add_head", "build_engines", "build_index", "compile_bundle", "evaluate_folder", "export_triton",
    "fit_adapter", "list_models", "profile", "serve",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'clipfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
