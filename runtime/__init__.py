"""Torch-free runtime: open a bundle, preprocess like open_clip, run the engine.

Depends on numpy, Pillow and onnxruntime only; a test imports it with torch blocked.
"""

from .batcher import DynamicBatcher
from .engine import Engine, Prediction
from .manifest import SCHEMA_VERSION, Manifest

__all__ = ["DynamicBatcher", "Engine", "Prediction", "Manifest", "SCHEMA_VERSION"]
