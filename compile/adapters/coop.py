"""CoOp (Zhou et al., IJCV 2022, "Learning to Prompt for Vision-Language Models"): import a trained
prompt learner, with inference as in the official code (KaiyangZhou/CoOp ``trainers/coop.py``).

The checkpoint is Dassl's ``prompt_learner/model.pth.tar-<epoch>`` (or ``model-best.pth.tar``):
``{'state_dict', 'epoch', 'optimizer', 'scheduler', 'val_result'}`` with ``state_dict['ctx']`` of
shape (n_ctx, W) (one context for all classes) or (n_cls, n_ctx, W) (class-specific, CSC). The
saved ``token_prefix``/``token_suffix`` are dropped, as the official ``load_model`` does: they are
rebuilt from the current class names. Per class ``k`` with name tokens ``c_k``, the prompt
"X X ... X {name}." is embedded and its placeholders replaced:

    end:    [SOS, ctx_k,                       c_k, ".", EOT, ...]
    middle: [SOS, ctx_k[:n//2], c_k, ctx_k[n//2:],   ".", EOT, ...]
    front:  [SOS, c_k, ctx_k,                       ".", EOT, ...]

With ``CTX_INIT`` set the official ``PromptLearner`` uses the init text instead of the ``X``s and
``n_ctx = len(ctx_init.split(" "))``; an init word of several BPE tokens leaves its last tokens in
the prompt. ``CTX_INIT`` and ``CLASS_TOKEN_POSITION`` are read from the run's Dassl ``log.txt``
when there is one (``--set`` wins); an unknown init is taken as one token per word.

``t_k = n(TextEncoder(prompt_k))`` pooled at the EOT position of the "end" tokenization (the
official uses that one for every position), and ``logits = exp(logit_scale) * f @ t.T``: one
linear branch, computed once at import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipfold.compile.adapters.base import Imported, ImportRequest, option, require_keys
from clipfold.compile.adapters.dassl import (
    check_width,
    load_dassl_state,
    require_labels,
    run_config,
    tensor,
    word_init_prefix,
)
from clipfold.compile.adapters.prompt_text import Prompts, PromptTextTower, build_prompts
from clipfold.compile.heads.ir import Head, Linear
from clipfold.errors import CheckpointError

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


def coop_prompt_embeddings(prompts: Prompts, ctx: torch.Tensor, position: str) -> torch.Tensor:
    """(C, L, W): the embedded prompts with the context spliced in at ``position``."""
    classes, n_ctx = prompts.embeddings.shape[0], prompts.n_ctx
    if ctx.ndim == 2:
        ctx = ctx.unsqueeze(0).expand(classes, -1, -1)
    prefix = prompts.embeddings[:, :1]
    suffix = prompts.embeddings[:, 1 + n_ctx:]
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)
    rows = []
    for k in range(classes):
        name, rest = suffix[k, :prompts.name_lens[k]], suffix[k, prompts.name_lens[k]:]
        if position == "middle":
            half = n_ctx // 2
            parts = [prefix[k], ctx[k, :half], name, ctx[k, half:], rest]
        else:
            parts = [prefix[k], name, ctx[k], rest]
        rows.append(torch.cat(parts, dim=0))
    return torch.stack(rows)


@torch.no_grad()
def import_coop(request: ImportRequest) -> Imported:
    labels = require_labels(request, "CoOp")
    state, file, epoch = load_dassl_state(request.checkpoint, "prompt_learner", request.options.get("epoch"))
    logged = (run_config(file) or {}).get("TRAINER.COOP.CLASS_TOKEN_POSITION", "end")  # the run's own, when logged
    position = option(request, "class_token_position", logged, CLASS_TOKEN_POSITIONS)
    require_keys(state, ("ctx",), "CoOp", file)
    ctx = tensor(state, "ctx", file)
    model = request.loaded.model
    tower = PromptTextTower(model)
    if ctx.ndim == 3:
        if ctx.shape[0] != len(labels):
            raise CheckpointError(f"{file}: class-specific context ctx {tuple(ctx.shape)} has {ctx.shape[0]} classes, "
                                  f"but {len(labels)} labels were given; pass the labels it was trained on")
    elif ctx.ndim != 2:
        raise CheckpointError(f"{file}: ctx has shape {tuple(ctx.shape)}; expected (n_ctx, width) or "
                              "(n_cls, n_ctx, width) for class-specific context")
    check_width("ctx", int(ctx.shape[-1]), tower.width, "text width", file)
    n_ctx = int(ctx.shape[-2])
    prefix, init = (None, {}) if ctx.ndim == 3 else word_init_prefix(request, file, "COOP", n_ctx)
    prompts = build_prompts(tower, request.loaded.tokenizer, labels, n_ctx, prefix)
    embedded = coop_prompt_embeddings(prompts, ctx, position)
    text = F.normalize(tower(embedded, prompts.pool_index).float(), dim=-1)
    scale = float(model.logit_scale.exp())
    head = Head(linears=(Linear(scale * text),), method="coop")
    return Imported(labels=labels, head=head, hyperparameters={
        "n_ctx": n_ctx, "csc": ctx.ndim == 3, "class_token_position": position, **init,
        "epoch": epoch, "checkpoint": file.name}, source=file)
