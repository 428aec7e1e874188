"""CoCoOp (Zhou et al., CVPR 2022, "Conditional Prompt Learning for Vision-Language Models"): import
a trained prompt learner, with inference as in the official code (KaiyangZhou/CoOp ``trainers/cocoop.py``).

The checkpoint is Dassl's ``prompt_learner/model.pth.tar-<epoch>``: ``ctx`` (n_ctx, W) and the
meta-net ``meta_net.linear1`` (D -> D // 16), ReLU, ``meta_net.linear2`` (D // 16 -> W), with ``D``
the image embedding width and ``W`` the text width. For each image

    pi     = linear2(relu(linear1(f)))                       (1, W)
    ctx_f  = ctx + pi                                        (n_ctx, W), the same for every class
    t_k    = n(TextEncoder([SOS, ctx_f, name_k, ".", EOT, ...]))
    logits = exp(logit_scale) * f @ t.T

The prompt prefix is the run's ``CTX_INIT`` text when there was one (as CoOp: read from Dassl's
``log.txt`` or ``--set ctx_init=``), else ``"X" * n_ctx``.

The official ``CustomCLIP.forward`` normalizes the image features *before* the prompt learner
reads them, so ``f`` here is exactly the unit image embedding the compiled graph already has: the
whole formula is a module over ``f`` (B, D). It runs the text tower once per image and class
(B x C prompts), which is why the import is flagged ``slow``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipfold.compile.adapters.base import Imported, ImportRequest, require_keys
from clipfold.compile.adapters.dassl import check_width, load_dassl_state, require_labels, tensor, word_init_prefix
from clipfold.compile.adapters.prompt_text import PromptTextTower, build_prompts
from clipfold.errors import CheckpointError

KEYS = ("ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias")


class CoCoOpLogits(nn.Module):
    """Unit image embedding ``f`` (B, D) -> CoCoOp logits (B, C); every weight is a constant."""

    def __init__(self, tower: PromptTextTower, embeddings: torch.Tensor, pool_index: torch.Tensor,
                 ctx: torch.Tensor, meta: dict[str, torch.Tensor], logit_scale: float):
        super().__init__()
        n_ctx = ctx.shape[0]
        self.tower = tower
        self.register_buffer("prefix", embeddings[:, :1].clone())  # (C, 1, W) start of text
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx:].clone())  # (C, S, W) name, ".", EOT, padding
        self.register_buffer("pool_index", pool_index.clone())
        self.register_buffer("ctx", ctx.clone())
        self.linear1 = nn.Linear(meta["linear1.weight"].shape[1], meta["linear1.weight"].shape[0])
        self.linear2 = nn.Linear(meta["linear2.weight"].shape[1], meta["linear2.weight"].shape[0])
        with torch.no_grad():
            for name in ("linear1", "linear2"):
                getattr(self, name).weight.copy_(meta[f"{name}.weight"])
                getattr(self, name).bias.copy_(meta[f"{name}.bias"])
        self.logit_scale = float(logit_scale)

    @property
    def num_classes(self) -> int:
        return int(self.prefix.shape[0])

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        batch, classes = f.shape[0], self.prefix.shape[0]
        shift = self.linear2(torch.relu(self.linear1(f)))  # (B, W)
        ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # (B, n_ctx, W)
        width = ctx.shape[-1]
        prompts = torch.cat([
            self.prefix.unsqueeze(0).expand(batch, -1, -1, -1),
            ctx.unsqueeze(1).expand(-1, classes, -1, -1),
            self.suffix.unsqueeze(0).expand(batch, -1, -1, -1),
        ], dim=2)  # (B, C, L, W)
        length = prompts.shape[2]
        index = self.pool_index.unsqueeze(0).expand(batch, -1).reshape(-1)
        text = self.tower(prompts.reshape(batch * classes, length, width), index)
        text = F.normalize(text, dim=-1).reshape(batch, classes, -1)
        return self.logit_scale * torch.einsum("bd,bcd->bc", f, text)


@torch.no_grad()
def import_cocoop(request: ImportRequest) -> Imported:
    labels = require_labels(request, "CoCoOp")
    state, file, epoch = load_dassl_state(request.checkpoint, "prompt_learner", request.options.get("epoch"))
    require_keys(state, KEYS, "CoCoOp", file)
    ctx = tensor(state, "ctx", file)
    meta = {k[len("meta_net."):]: tensor(state, k, file) for k in KEYS[1:]}
    model = request.loaded.model
    tower = PromptTextTower(model)
    embed_dim = int(request.loaded.info.embed_dim)
    if ctx.ndim != 2:
        raise CheckpointError(f"{file}: ctx has shape {tuple(ctx.shape)}; CoCoOp learns one (n_ctx, width) context")
    check_width("ctx", int(ctx.shape[1]), tower.width, "text width", file)
    hidden = meta["linear1.weight"].shape[0]
    expected = {"linear1.weight": (hidden, embed_dim), "linear1.bias": (hidden,),
                "linear2.weight": (tower.width, hidden), "linear2.bias": (tower.width,)}
    for name, shape in expected.items():
        if tuple(meta[name].shape) != shape:
            raise CheckpointError(f"{file}: meta_net.{name} has shape {tuple(meta[name].shape)}, expected {shape} "
                                  f"for image embeddings of width {embed_dim} and text width {tower.width}; "
                                  "the checkpoint was trained on another backbone")
    n_ctx = int(ctx.shape[0])
    prefix, init = word_init_prefix(request, file, "COCOOP", n_ctx)
    prompts = build_prompts(tower, request.loaded.tokenizer, labels, n_ctx, prefix)
    module = CoCoOpLogits(tower, prompts.embeddings, prompts.pool_index, ctx, meta,
                          float(model.logit_scale.exp())).eval()
    return Imported(labels=labels, head=None, logits_module=module, slow=True,
                    hyperparameters={"n_ctx": n_ctx, "meta_hidden": int(hidden), **init, "epoch": epoch,
                                     "checkpoint": file.name}, source=file)
