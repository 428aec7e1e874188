"""MaPLe (Khattak et al., CVPR 2023, "Multi-modal Prompt Learning"): import trained multi-modal
prompts, with inference as in the official code (muzairkhattak/multimodal-prompt-learning
``trainers/maple.py``: MultiModalPromptLearner, TextEncoder; ``clip/model.py``:
VisionTransformer_MaPLe, ResidualAttentionBlock_MaPLe).

The checkpoint is Dassl's ``MultiModalPromptLearner/model.pth.tar-<epoch>`` holding the whole
CustomCLIP's state dict; the prompts are ``prompt_learner.ctx`` (n, Wt),
``prompt_learner.proj`` (Wt -> Wv), and for ``i < depth - 1`` ``prompt_learner.compound_prompts_text.<i>``
(n, Wt) with ``prompt_learner.compound_prompt_projections.<i>`` (Wt -> Wv). The depth is read from
the checkpoint (number of compound prompts + 1). With ``v_0 = proj(ctx)`` and
``v_i = compound_prompt_projections.<i-1>(text_{i-1})`` for ``1 <= i < depth``:

* image: ``x = ln_pre([cls, patches] + pos ++ v_0)`` (the n visual prompts *appended after* the
  patch tokens, without positional embedding); before layer ``i`` (1 <= i < depth) the last n tokens
  are replaced by ``v_i`` (raw: no positions, no ln_pre); the output is
  ``ln_post(x[:, 0]) @ proj``, the unnormalized embedding open_clip's visual returns;
* text: the prompt ``CTX_INIT + " " + name + "."`` tokenized, its tokens ``1..n`` replaced by ``ctx``
  (``MultiModalPromptLearner``: with ``CTX_INIT`` set and ``n <= 4`` the prompt prefix is the init
  text, so the official configs' ``N_CTX: 2``, ``CTX_INIT: "a photo of a"`` give
  ``[SOS, ctx, ctx, "of", "a", name, ".", EOT]``; otherwise ``"X" * n``), + positions; before layer
  ``i`` tokens ``1..n`` are replaced by ``text_{i-1}``; pooled at EOT and projected (see ``text.py``).
  ``CTX_INIT`` is not in the checkpoint: it is read from the run's Dassl ``log.txt`` (the printed
  config), or given as ``--set ctx_init=...``; an import where it cannot be known is refused.

``logits = exp(logit_scale) * n(image) @ n(text).T``: the text side is one linear branch computed
at import, the image side a replacement tower. The official code runs in fp16; this runs in fp32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clipfold.compile.adapters.base import Imported, ImportRequest, require_keys
from clipfold.compile.adapters.coop import coop_prompt_embeddings
from clipfold.compile.adapters.dassl import context_init, load_dassl_state, require_labels, tensor
from clipfold.compile.adapters.prompt_text import PromptTextTower, build_prompts
from clipfold.compile.heads.ir import Head, Linear
from clipfold.errors import CheckpointError, ConfigError

PREFIX = "prompt_learner."
KEYS = (PREFIX + "ctx", PREFIX + "proj.weight", PREFIX + "proj.bias")


def _check_vision_tower(visual: nn.Module) -> None:
    import open_clip

    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ConfigError(f"MaPLe inserts prompt tokens into a ViT; this model's image tower is "
                          f"{type(visual).__name__}, expected open_clip's VisionTransformer")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ConfigError(f"MaPLe reads the class token; this VisionTransformer pools with "
                          f"{'an attentional pooler' if visual.attn_pool is not None else repr(visual.pool_type)}")


class MapleVisual(nn.Module):
    """Normalized pixels (B, 3, H, W) -> MaPLe's image embedding (B, E), unnormalized.

    A copy of the model's VisionTransformer (so its patch-embedding conv is the first 3-channel
    Conv2d of this module) run block by block with the visual prompts, all held as buffers.
    """

    def __init__(self, visual: nn.Module, shallow: torch.Tensor, deep: list[torch.Tensor]):
        super().__init__()
        _check_vision_tower(visual)
        self.visual = copy.deepcopy(visual).eval()
        self.register_buffer("shallow", shallow.clone())  # (n, Wv) = proj(ctx)
        for i, prompt in enumerate(deep):
            self.register_buffer(f"deep_{i}", prompt.clone())
        self.depth = len(deep) + 1
        self.n_ctx = int(shallow.shape[0])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid**2, Wv)
        batch = x.shape[0]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = torch.cat([x, self.shallow.unsqueeze(0).expand(batch, -1, -1)], dim=1)
        x = v.ln_pre(x)
        batch_first = getattr(v.transformer, "batch_first", True)
        for i, block in enumerate(v.transformer.resblocks):
            if 1 <= i < self.depth:
                prompt = getattr(self, f"deep_{i - 1}").unsqueeze(0).expand(batch, -1, -1)
                x = torch.cat([x[:, :x.shape[1] - self.n_ctx], prompt], dim=1)
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        pooled = v.ln_post(x[:, 0])  # per-token LayerNorm: the same before or after taking the class token
        return pooled @ v.proj if v.proj is not None else pooled


def _linear(state: dict, name: str, file, in_width: int, out_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = tensor(state, name + ".weight", file), tensor(state, name + ".bias", file)
    if tuple(weight.shape) != (out_width, in_width) or tuple(bias.shape) != (out_width,):
        raise CheckpointError(f"{file}: {name} maps {tuple(weight.shape[::-1])} with bias {tuple(bias.shape)}; this "
                              f"model needs text width {in_width} -> vision width {out_width}; the checkpoint was "
                              "trained on another backbone")
    return weight, bias


def _check_frozen_backbone(state: dict, visual: nn.Module, file) -> None:
    """The checkpoint also holds the frozen CLIP it was trained with (OpenAI key names, which open_clip's
    ViT shares); a patch embedding or position table of another shape means another backbone."""
    for key in ("conv1.weight", "positional_embedding"):
        saved = state.get("image_encoder." + key)
        ours = getattr(visual.conv1, "weight") if key == "conv1.weight" else visual.positional_embedding
        if isinstance(saved, torch.Tensor) and tuple(saved.shape) != tuple(ours.shape):
            raise CheckpointError(f"{file} was trained on another backbone: its image_encoder.{key} has shape "
                                  f"{tuple(saved.shape)}, this model's has {tuple(ours.shape)}")


@torch.no_grad()
def import_maple(request: ImportRequest) -> Imported:
    labels = require_labels(request, "MaPLe")
    state, file, epoch = load_dassl_state(request.checkpoint, "MultiModalPromptLearner", request.options.get("epoch"))
    require_keys(state, KEYS, "MaPLe", file)
    model = request.loaded.model
    _check_vision_tower(model.visual)
    tower = PromptTextTower(model)
    vision_width = int(model.visual.conv1.out_channels)
    _check_frozen_backbone(state, model.visual, file)

    ctx = tensor(state, PREFIX + "ctx", file)
    if ctx.ndim != 2 or ctx.shape[1] != tower.width:
        raise CheckpointError(f"{file}: {PREFIX}ctx has shape {tuple(ctx.shape)}; expected (n_ctx, {tower.width}) "
                              f"for this model's text width {tower.width}")
    n_ctx = int(ctx.shape[0])
    weight, bias = _linear(state, PREFIX + "proj", file, tower.width, vision_width)
    shallow = ctx @ weight.T + bias

    count = 0
    while f"{PREFIX}compound_prompts_text.{count}" in state:
        count += 1
    layers = min(tower.layers, len(model.visual.transformer.resblocks))
    if count > layers - 1:
        raise CheckpointError(f"{file} has {count} compound prompts (depth {count + 1}), but this model's "
                              f"transformers have {layers} layers (at most {layers - 1} compound prompts)")
    deep_text, deep_visual = [], []
    for i in range(count):
        key = f"{PREFIX}compound_prompts_text.{i}"
        require_keys(state, (f"{PREFIX}compound_prompt_projections.{i}.weight",
                             f"{PREFIX}compound_prompt_projections.{i}.bias"), "MaPLe", file)
        prompt = tensor(state, key, file)
        if tuple(prompt.shape) != (n_ctx, tower.width):
            raise CheckpointError(f"{file}: {key} has shape {tuple(prompt.shape)}, expected ({n_ctx}, {tower.width})")
        w, b = _linear(state, f"{PREFIX}compound_prompt_projections.{i}", file, tower.width, vision_width)
        deep_text.append(prompt)
        deep_visual.append(prompt @ w.T + b)

    init, init_source = context_init(request, file, "MAPLE")
    if init is None:
        raise ConfigError(f"{file}: MaPLe keeps the CTX_INIT words past N_CTX in its prompt, and this run's "
                          "CTX_INIT cannot be known (no ctx_init option, no Dassl log.txt beside the checkpoint "
                          "folder); pass --set ctx_init='a photo of a' (both official configs and train.py's "
                          "default) or --set ctx_init= for a randomly initialised context")
    prefix = init if init and n_ctx <= 4 else None  # MultiModalPromptLearner: `if ctx_init and (n_ctx) <= 4`
    prompts = build_prompts(tower, request.loaded.tokenizer, labels, n_ctx, prefix)
    embedded = coop_prompt_embeddings(prompts, ctx, "end")
    text = F.normalize(tower(embedded, prompts.pool_index, deep_text, n_ctx).float(), dim=-1)
    head = Head(linears=(Linear(float(model.logit_scale.exp()) * text),), method="maple")
    visual = MapleVisual(model.visual, shallow, deep_visual).eval()
    return Imported(labels=labels, head=head, visual=visual, hyperparameters={
        "n_ctx": n_ctx, "prompt_depth": count + 1, "ctx_init": init, "ctx_init_source": init_source,
        "prompt_prefix": prefix if prefix is not None else " ".join(["X"] * n_ctx),
        "epoch": epoch, "checkpoint": file.name}, source=file)
