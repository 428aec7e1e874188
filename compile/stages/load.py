"""Stage 1: load an open_clip model from its registry name and a pretrained tag or local file."""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipfold.compile import tiny
from clipfold.compile.stages.tokenizer import check_buildable, model_tokenizer
from clipfold.errors import CheckpointError, ModelError, UnknownModelError
from clipfold.runtime.bundle.files import sha256_file
from clipfold.runtime.bundle.schema import ModelInfo, PreprocessSpec

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass
class LoadedModel:
    model: Any  # open_clip CLIP / CustomTextCLIP, in eval mode, fp32, CPU
    tokenizer: Any
    preprocess: PreprocessSpec
    info: ModelInfo


def list_models() -> list[str]:
    tiny.register()
    return open_clip.list_models()


def load_model(name: str, pretrained: str | None = None, tokenizer: str | Path | None = None) -> LoadedModel:
    """Build ``name`` from open_clip's registry and load weights.

    ``pretrained`` is an open_clip tag (through open_clip's own loader), a local checkpoint path
    (safetensors, or torch.load with weights_only=True), or None: the embedded tiny model gets
    its trained checkpoint, any other model keeps random weights (for shapes and latency).
    ``tokenizer``: a local Hugging Face tokenizer (folder or ``tokenizer.json``) for models that
    read text with one (SigLIP); see :mod:`.tokenizer`.
    """
    known = list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}: not in open_clip's registry of {len(known)} models{hint} "
            "(`clipfold models` lists them)")

    check_buildable(name)  # before open_clip reaches for the network
    text_tokenizer = model_tokenizer(name, tokenizer)
    if pretrained is None and name == tiny.MODEL_NAME:
        pretrained = str(tiny.checkpoint_path())

    path = _as_path(pretrained)
    checkpoint_sha = None
    if path is not None:
        checkpoint_sha = sha256_file(path)
        with _without_random_init_warning():  # the weights are loaded right below
            model = _create(name, None)
        _load_local_checkpoint(model, path)
    elif pretrained is not None:
        model = _create_with_tag(name, pretrained)
    else:
        model = _create(name, None)
        log.warning("model %s has random weights (no --pretrained given)", name)

    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=text_tokenizer,
        preprocess=preprocess_spec(model),
        info=ModelInfo(
            name=name,
            pretrained=str(pretrained) if pretrained is not None else None,
            checkpoint_sha256=checkpoint_sha,
            family=model_family(model),
            embed_dim=int(_embed_dim(model)),
        ),
    )


def _as_path(pretrained: str | None) -> Path | None:
    """A pretrained value that looks like a file is a path; it must then exist."""
    if pretrained is None:
        return None
    path = Path(pretrained)
    if path.is_file():
        return path
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; expected a checkpoint file")
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in pretrained or "\\" in pretrained:
        raise CheckpointError(f"checkpoint file {path} not found")
    return None


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _without_random_init_warning():
    """open_clip warns on the root logger that a model built without a tag is random; not so
    when clipfold loads a local checkpoint into it next."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _create(name: str, pretrained: str | None):
    try:
        return open_clip.create_model(name, pretrained=pretrained, device="cpu", precision="fp32")
    except Exception as exc:  # open_clip raises bare RuntimeError/ValueError for many causes
        raise ModelError(f"open_clip could not build {name!r}: {exc}") from exc


def _create_with_tag(name: str, tag: str):
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise CheckpointError(
            f"{tag!r} is neither a local checkpoint file nor a pretrained tag of {name}; "
            f"its tags are {tags or 'none'}")
    try:
        return _create(name, tag)
    except ModelError as exc:
        raise CheckpointError(
            f"could not fetch pretrained weights {name}/{tag} through open_clip ({exc.__cause__}); "
            "without network access pass a local checkpoint file instead") from exc


def _load_local_checkpoint(model, path: Path) -> None:
    """Read ``path`` with the one safe reader (no code in it runs), then fit the state dict to the
    model as open_clip's ``load_checkpoint`` does (open_clip/factory.py: its own ``torch.load`` is
    not used, so no file reaches a loader clipfold has not vetted)."""
    from clipfold.compile.stages.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)  # CheckpointError naming the file for anything unreadable
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"checkpoint {path} holds no state dict")
    if next(iter(state)).startswith("module"):  # DataParallel's prefix, as open_clip strips it
        state = {k[7:]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors: {bad[:5]} hold other values")
    try:
        fitted = _fit_state_dict(model, dict(state))
        model.load_state_dict(fitted, strict=True)
    except Exception as exc:
        raise CheckpointError(_mismatch_message(model, state, path, exc)) from None


def _fit_state_dict(model, state: dict) -> dict:
    """open_clip's ``load_checkpoint`` steps between reading and ``load_state_dict``."""
    from open_clip.factory import (
        convert_state_dict,
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )

    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    position_ids = "text.transformer.embeddings.position_ids"
    if position_ids in state and not hasattr(model, position_ids):
        del state[position_ids]
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    return state


def _first_line(exc: Exception) -> str:
    """Library errors (torch's unpickler) span many lines; the CLI prints one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _mismatch_message(model, state: dict, path: Path, exc: Exception) -> str:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = [f"checkpoint {path} does not fit the architecture"]
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
    if len(parts) == 1:
        parts.append(_first_line(exc))
    return "; ".join(parts)


def model_family(model) -> str:
    kind = type(model.visual).__name__
    return {
        "VisionTransformer": "vit",
        "ModifiedResNet": "modified-resnet",
        "TimmModel": "timm",
    }.get(kind, kind)


def _embed_dim(model) -> int:
    out = getattr(model.visual, "output_dim", None)
    if out is None:
        with torch.no_grad():
            size = model.visual.image_size
            size = size if isinstance(size, (tuple, list)) else (size, size)
            out = model.visual(torch.zeros(1, 3, *size)).shape[-1]
    return out


def preprocess_spec(model) -> PreprocessSpec:
    """open_clip's eval preprocessing for ``model``, as recorded in the manifest."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return PreprocessSpec(
        image_size=size,
        resize_mode=cfg.get("resize_mode", "shortest"),
        interpolation=cfg.get("interpolation", "bicubic"),
        fill_color=int(cfg.get("fill_color", 0)),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        folded=True,
    )
