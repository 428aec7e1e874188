"""Stage 2: the zero-shot head, built once at compile time so the text tower never runs at serving.

The head is the prompt ensemble of CLIP's zero-shot evaluation: embed every template filled with
the class name, L2-normalize each embedding, average per class, renormalize. Logits are
``exp(logit_scale) * f @ W.T`` (+ ``logit_bias`` for SigLIP-style models, scored with sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from clipfold.errors import ConfigError

from . import tiny
from .heads import Head, Linear

TEMPLATE_PRESETS = ("imagenet80", "simple", "tiny", "label")


@dataclass(frozen=True)
class ZeroShotHead:
    class_embeddings: torch.Tensor  # (C, D), unit rows
    logit_scale: float  # already exponentiated
    logit_bias: float | None
    activation: str  # "softmax" or "sigmoid"
    templates: tuple[str, ...]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The unfolded reference: scaled cosine similarity of unit features to class rows."""
        out = self.logit_scale * features @ self.class_embeddings.T
        return out + self.logit_bias if self.logit_bias is not None else out

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.logits(features)
        return logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid()

    def to_head(self) -> Head:
        """The ensemble as one linear branch of the general head (scale folded into the weight)."""
        bias = None
        if self.logit_bias is not None:
            bias = torch.full((self.class_embeddings.shape[0],), self.logit_bias)
        return Head(linears=(Linear(self.logit_scale * self.class_embeddings, bias),),
                    activation=self.activation, method="zero-shot")


def resolve_templates(spec: str | Sequence[str] | None, model_name: str) -> tuple[str, ...]:
    """A preset name, a file with one ``{}`` template per line, or explicit templates.

    The default is the tiny model's own ensemble for the tiny model, and the 80 ImageNet
    templates of CLIP's paper for every other model.
    """
    if spec is None:
        spec = "tiny" if model_name == tiny.MODEL_NAME else "imagenet80"
    if isinstance(spec, str):
        if spec == "imagenet80":
            from open_clip import OPENAI_IMAGENET_TEMPLATES as presets
        elif spec == "simple":
            from open_clip import SIMPLE_IMAGENET_TEMPLATES as presets
        elif spec == "tiny":
            return tuple(tiny.TEMPLATES)
        elif spec == "label":
            return ("{}",)
        elif Path(spec).is_file():
            lines = Path(spec).read_text(encoding="utf-8").splitlines()
            return _check_templates([ln.strip() for ln in lines if ln.strip()], source=spec)
        else:
            raise ConfigError(
                f"templates {spec!r} is neither a preset ({', '.join(TEMPLATE_PRESETS)}) nor a file")
        # open_clip keeps its presets as lambdas; calling them with "{}" recovers the template.
        return tuple(t("{}") for t in presets)
    return _check_templates(list(spec), source="the given templates")


def _check_templates(templates: list[str], source: str) -> tuple[str, ...]:
    if not templates:
        raise ConfigError(f"{source} holds no templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"templates in {source} must contain exactly one '{{}}'; these do not: {bad[:3]}")
    return tuple(templates)


@torch.no_grad()
def build_zero_shot_head(model, tokenizer, labels: Sequence[str], templates: Sequence[str],
                         batch_size: int = 256) -> ZeroShotHead:
    prompts = [t.format(label) for label in labels for t in templates]
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size])
        embeddings.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(embeddings).reshape(len(labels), len(templates), -1)
    class_embeddings = F.normalize(per_prompt.mean(dim=1), dim=-1)

    bias = getattr(model, "logit_bias", None)
    return ZeroShotHead(
        class_embeddings=class_embeddings.contiguous(),
        logit_scale=float(model.logit_scale.exp().item()),
        logit_bias=float(bias.item()) if bias is not None else None,
        activation="sigmoid" if bias is not None else "softmax",
        templates=tuple(templates),
    )
