"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024, "Low-Rank Few-Shot Adaptation of Vision-Language
Models"): its saved low-rank updates merged into the open_clip attention weights.

Official code: MaxZanella/CLIP-LoRA — ``loralib/layers.py`` (``LoRALayer``, ``LinearLoRA``,
``PlainMultiheadAttentionLoRA``), ``loralib/utils.py`` (``apply_lora``, ``save_lora``,
``load_lora``, ``INDEX_POSITIONS_*``) and ``lora.py`` (``evaluate_lora``).

The official model splits each selected ``nn.MultiheadAttention`` into four linear layers
(``q_proj``, ``k_proj``, ``v_proj`` the rows ``[0:E]``, ``[E:2E]``, ``[2E:3E]`` of
``in_proj_weight``; ``proj`` = ``out_proj``) and adds to each enabled one the branch
``x @ (B @ A).T * scaling`` with ``A`` (r, E), ``B`` (E, r) and ``scaling = alpha / sqrt(r)``
(not LoRA's usual ``alpha / r``). At inference (dropout off) that equals the plain layer with

    W <- W + scaling * B @ A

so the update folds into the weights and the exported graph is the unchanged architecture.

The file (``save_lora``) is ``torch.save({'weights': {'layer_<i>': {'q_proj' | 'k_proj' |
'v_proj' | 'proj': {'w_lora_A', 'w_lora_B'}}}, 'metadata': {'r', 'alpha', 'encoder', 'params',
'position'}})``. ``layer_<i>`` is the i-th attention replaced by ``apply_lora``: the text blocks
(``encoder`` text or both) in order, then the vision blocks (vision or both), each restricted to
the block indices of ``position``. The vision indices depend on the backbone (``ViT-L/14`` has its
own table); the file does not record it, so it is inferred from the vision depth (24 blocks:
ViT-L/14) unless ``--set backbone=...`` names it. The head is the zero-shot prompt ensemble of
the merged text tower (the official evaluation scores cosine similarity; the model's logit scale
multiplies every logit alike and changes no ranking).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from clipfold.compile.adapters.base import Imported, ImportRequest, load_torch_checkpoint, option, require_keys
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.errors import CheckpointError, ConfigError

# loralib/utils.py: which residual blocks get LoRA for each ``position``.
INDEX_POSITIONS_TEXT: dict[str, tuple[int, ...]] = {
    "top1": (11,), "top2": (10, 11), "top3": (9, 10, 11),
    "bottom": (0, 1, 2, 3), "mid": (4, 5, 6, 7), "up": (8, 9, 10, 11),
    "half-up": (6, 7, 8, 9, 10, 11), "half-bottom": (0, 1, 2, 3, 4, 5), "all": tuple(range(12)),
}
_VIT_B = {"bottom": (0, 1, 2, 3), "mid": (4, 5, 6, 7), "up": (8, 9, 10, 11),
          "half-up": (6, 7, 8, 9, 10, 11), "half-bottom": (0, 1, 2, 3, 4, 5), "all": tuple(range(12))}
INDEX_POSITIONS_VISION: dict[str, dict[str, tuple[int, ...]]] = {
    "ViT-B/16": {"top": (11,), "top3": (9, 10, 11), **_VIT_B},
    "ViT-B/32": dict(_VIT_B),
    "ViT-L/14": {"half-up": tuple(range(12, 24)), "half-bottom": tuple(range(12)), "all": tuple(range(24))},
}
BACKBONES = ("auto",) + tuple(INDEX_POSITIONS_VISION)
ENCODERS = ("text", "vision", "both")
# save_lora: the letter in ``params`` -> the key of its pair in each layer's entry.
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}


@dataclass(frozen=True)
class LoraMetadata:
    r: int
    alpha: float
    encoder: str
    params: tuple[str, ...]
    position: str

    def __post_init__(self) -> None:
        if self.r < 1:
            raise CheckpointError(f"CLIP-LoRA metadata r={self.r}; expected a rank >= 1")
        if self.encoder not in ENCODERS:
            raise CheckpointError(f"CLIP-LoRA metadata encoder={self.encoder!r}; expected one of {ENCODERS}")
        unknown = [p for p in self.params if p not in PROJECTIONS]
        if unknown or not self.params:
            raise CheckpointError(f"CLIP-LoRA metadata params={list(self.params)}; expected a non-empty "
                                  f"subset of {list(PROJECTIONS)}")

    @property
    def scaling(self) -> float:
        """``LoRALayer.scaling`` of the official code: alpha / sqrt(r)."""
        return self.alpha / math.sqrt(self.r)

    @classmethod
    def from_checkpoint(cls, metadata: Any, path) -> "LoraMetadata":
        if not isinstance(metadata, Mapping):
            raise CheckpointError(f"{path}: 'metadata' is {type(metadata).__name__}; expected a dict")
        require_keys(metadata, ("r", "alpha", "encoder", "params", "position"), "CLIP-LoRA metadata", path)
        params = metadata["params"]
        params = (params,) if isinstance(params, str) else tuple(params)
        try:
            return cls(int(metadata["r"]), float(metadata["alpha"]), str(metadata["encoder"]),
                       tuple(str(p) for p in params), str(metadata["position"]))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable CLIP-LoRA metadata {dict(metadata)}: {exc}") from None


def _blocks(tower: Any, name: str) -> list[nn.Module]:
    transformer = getattr(tower, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise ConfigError(f"CLIP-LoRA needs a transformer {name} tower with residual blocks; this model's "
                          f"{name} tower is {type(tower).__name__}")
    return list(blocks)


def _text_tower(model: nn.Module) -> Any:
    return model.text if hasattr(model, "text") and not hasattr(model, "transformer") else model


def infer_backbone(model: nn.Module) -> str:
    """The official vision table for this depth: ViT-L/14's for 24 blocks, else ViT-B/16's."""
    return "ViT-L/14" if len(_blocks(model.visual, "image")) == 24 else "ViT-B/16"


def lora_attention_layers(model: nn.Module, metadata: LoraMetadata,
                          backbone: str) -> list[tuple[str, nn.MultiheadAttention]]:
    """The attentions in ``apply_lora`` order: (name, module), text blocks first, then vision."""
    towers = []
    if metadata.encoder in ("text", "both"):
        if metadata.position not in INDEX_POSITIONS_TEXT:
            raise CheckpointError(f"CLIP-LoRA position {metadata.position!r} has no text blocks in the official "
                                  f"table; known: {sorted(INDEX_POSITIONS_TEXT)}")
        towers.append(("text", _blocks(_text_tower(model), "text"), INDEX_POSITIONS_TEXT[metadata.position]))
    if metadata.encoder in ("vision", "both"):
        table = INDEX_POSITIONS_VISION[backbone]
        if metadata.position not in table:
            raise CheckpointError(f"CLIP-LoRA position {metadata.position!r} has no vision blocks for {backbone} in "
                                  f"the official table; known: {sorted(table)} (--set backbone=... to choose another)")
        towers.append(("visual", _blocks(model.visual, "image"), table[metadata.position]))
    layers = []
    for tower, blocks, indices in towers:
        for i, block in enumerate(blocks):
            if i not in indices:
                continue
            found = [(n, m) for n, m in block.named_children() if isinstance(m, nn.MultiheadAttention)]
            if not found:
                raise ConfigError(f"{tower} block {i} has no nn.MultiheadAttention ({type(block).__name__}); "
                                  "CLIP-LoRA merges into open_clip's standard attention only")
            layers += [(f"{tower}.transformer.resblocks.{i}.{n}", m) for n, m in found]
    return layers


def _pair(entry: Any, key: str, layer: str, path) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(entry, Mapping) or key not in entry:
        found = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
        raise CheckpointError(f"{path}: {layer} has no {key!r} entry (found {found}); expected one per "
                              "enabled projection in metadata params")
    pair = entry[key]
    require_keys(pair if isinstance(pair, Mapping) else {}, ("w_lora_A", "w_lora_B"), f"CLIP-LoRA {layer}.{key}", path)
    a, b = pair["w_lora_A"], pair["w_lora_B"]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise CheckpointError(f"{path}: {layer}.{key} holds {type(a).__name__}/{type(b).__name__}; expected tensors")
    return a, b


@torch.no_grad()
def merge_lora(model: nn.Module, checkpoint: Mapping[str, Any], backbone: str = "auto",
               path: Any = "checkpoint") -> tuple[LoraMetadata, list[str]]:
    """Add ``scaling * B @ A`` to every enabled projection, in place; returns the merged layer names.

    Every shape and value is checked before the first weight changes, so a bad file leaves the
    model as it was.
    """
    require_keys(checkpoint, ("weights", "metadata"), "CLIP-LoRA", path)
    metadata = LoraMetadata.from_checkpoint(checkpoint["metadata"], path)
    weights = checkpoint["weights"]
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: 'weights' is {type(weights).__name__}; expected a dict of layer_<i>")
    if backbone == "auto":
        backbone = infer_backbone(model) if metadata.encoder != "text" else "ViT-B/16"
    layers = lora_attention_layers(model, metadata, backbone)
    expected = [f"layer_{i}" for i in range(len(layers))]
    if sorted(weights) != sorted(expected):
        raise CheckpointError(
            f"{path} holds LoRA for {sorted(weights)}, but encoder={metadata.encoder!r} position="
            f"{metadata.position!r} selects {len(layers)} attention layers here ({expected}); the file "
            "was saved for a model of another depth (or pass --set backbone=...)")
    updates = []
    for i, (name, attn) in enumerate(layers):
        dim = attn.embed_dim
        if not attn._qkv_same_embed_dim:
            raise ConfigError(f"{name} has separate q/k/v weights; CLIP-LoRA merges into a packed in_proj_weight")
        for letter in metadata.params:
            a, b = _pair(weights[f"layer_{i}"], PROJECTIONS[letter], f"layer_{i} ({name})", path)
            if tuple(a.shape) != (metadata.r, dim) or tuple(b.shape) != (dim, metadata.r):
                raise CheckpointError(
                    f"{path}: layer_{i}.{PROJECTIONS[letter]} ({name}) has A {tuple(a.shape)} and B "
                    f"{tuple(b.shape)}; expected A ({metadata.r}, {dim}) and B ({dim}, {metadata.r}) for "
                    f"rank {metadata.r} on this model's width {dim}")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise CheckpointError(f"{path}: layer_{i}.{PROJECTIONS[letter]} ({name}) holds NaN or inf values")
            delta = metadata.scaling * (b.double() @ a.double())
            if letter == "o":
                target, rows = attn.out_proj.weight, slice(0, dim)
            else:
                k = "qkv".index(letter)
                target, rows = attn.in_proj_weight, slice(k * dim, (k + 1) * dim)
            updates.append((target, rows, delta))
    for target, rows, delta in updates:
        target[rows] = (target[rows].double() + delta).to(target.dtype)
    return metadata, [name for name, _ in layers]


def import_lora(request: ImportRequest) -> Imported:
    if not request.labels:
        raise ConfigError("CLIP-LoRA checkpoints hold no class names; pass --labels")
    checkpoint = load_torch_checkpoint(request.checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{request.checkpoint} holds a {type(checkpoint).__name__}; expected CLIP-LoRA's "
                              "{'weights': ..., 'metadata': ...} dict")
    backbone = option(request, "backbone", "auto", BACKBONES)
    model = request.loaded.model
    metadata, merged = merge_lora(model, checkpoint, backbone, request.checkpoint)
    zero_shot = build_zero_shot_head(model, request.loaded.tokenizer, request.labels, request.templates)
    head = dataclasses.replace(zero_shot.to_head(), method="clip-lora")
    hyper = {"r": metadata.r, "alpha": metadata.alpha, "scaling": metadata.scaling, "encoder": metadata.encoder,
             "params": list(metadata.params), "position": metadata.position, "merged_layers": merged,
             "templates": list(request.templates)}
    if metadata.encoder != "text":
        hyper["vision_table"] = infer_backbone(model) if backbone == "auto" else backbone
    return Imported(labels=tuple(request.labels), head=head, hyperparameters=hyper)
