"""Torch-free runtime: open a bundle, preprocess like open_clip, run the engine.

Depends on numpy, Pillow and onnxruntime only; a test imports it with torch blocked.
"""

from clipfold.runtime.batcher import DynamicBatcher
from clipfold.runtime.bundle.schema import SCHEMA_VERSION, Manifest
from clipfold.runtime.engine import Engine, Prediction

__all__ = ["DynamicBatcher", "Engine", "Prediction", "Manifest", "SCHEMA_VERSION"]
