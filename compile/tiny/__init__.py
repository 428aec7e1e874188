"""The embedded default model, ``clipfold-tiny``: a small ViT / causal-text CLIP.

Its architecture is an open_clip model config (``clipfold-tiny.json``) registered with open_clip's
own registry, so every open_clip code path (create_model, get_tokenizer, preprocess config)
treats it like any built-in model. Its weights (``clipfold-tiny.safetensors``) were produced by
``make train-tiny`` (``python -m clipfold.compile.tiny.train``) on the procedural data of
:mod:`clipfold.compile.tiny.data`; the held-out zero-shot accuracy is recorded in
``benchmarks/results/tiny_model.json``.
"""

from __future__ import annotations

from pathlib import Path

from clipfold.errors import CheckpointError

MODEL_NAME = "clipfold-tiny"
HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / f"{MODEL_NAME}.json"
CHECKPOINT_PATH = HERE / f"{MODEL_NAME}.safetensors"

# The zero-shot prompt ensemble of the tiny model: the caption prefixes it was trained with.
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
)

_registered = False


def register() -> None:
    """Add the tiny model's config to open_clip's registry (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(CONFIG_PATH)
    _registered = True


def checkpoint_path() -> Path:
    if not CHECKPOINT_PATH.is_file():
        raise CheckpointError(
            f"the embedded tiny model's weights {CHECKPOINT_PATH} are missing; "
            "run `make train-tiny` to produce them")
    return CHECKPOINT_PATH
