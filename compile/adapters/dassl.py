"""Dassl checkpoints (the trainer framework of CoOp, CoCoOp, MaPLe, CLIP-Adapter and TaskRes).

Dassl saves ``<output>/<model name>/model.pth.tar-<epoch>`` (and ``model-best.pth.tar``) as
``{'state_dict', 'epoch', 'optimizer', 'scheduler', 'val_result'}``. Importers take the file or
the output directory; the state dict is read through :func:`~.base.load_torch_checkpoint`, which
never runs checkpoint code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from clipfold.compile.adapters.base import ImportRequest, load_torch_checkpoint
from clipfold.errors import CheckpointError, ConfigError


def resolve_dassl_file(path: Path, model_name: str, epoch: str | None = None) -> Path:
    """A checkpoint file, or Dassl's output directory holding ``<model_name>/model-best.pth.tar``
    or ``model.pth.tar-<epoch>`` (the official ``load_model``; without either, the last epoch)."""
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path / model_name if (path / model_name).is_dir() else path
    wanted = f"model.pth.tar-{epoch}" if epoch else "model-best.pth.tar"
    if (folder / wanted).is_file():
        return folder / wanted
    epochs = sorted((int(m.group(1)), p) for p in folder.glob("model.pth.tar-*")
                    if (m := re.fullmatch(r"model\.pth\.tar-(\d+)", p.name)))
    if epoch is None and epochs:
        return epochs[-1][1]
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(f"{path} holds no Dassl checkpoint {folder.name}/{wanted}; expected "
                          f"{model_name}/model-best.pth.tar or {model_name}/model.pth.tar-<epoch>; found {found}")


_CONFIG_LINE = re.compile(r"^((?:  )*)([A-Za-z0-9_]+):(?: (.*))?$")


def _config_logs(path: Path) -> list[Path]:
    """Dassl's ``<output>/log.txt`` (then ``log.txt-<time>``, newest first) for an output folder or a file in it."""
    path = Path(path)
    folders = [path] if path.is_dir() else [path.parent.parent, path.parent]
    logs = []
    for folder in folders:
        if (folder / "log.txt").is_file():
            logs.append(folder / "log.txt")
        logs += sorted(folder.glob("log.txt-*"), reverse=True)
    return logs


def run_config(path: Path) -> dict[str, str] | None:
    """The run's config as Dassl's ``train.py`` prints it to ``<output>/log.txt`` (``print_args``: a
    ``** Config **`` banner, then the yacs ``CfgNode``, two spaces per level, strings unquoted), as
    dotted keys -> raw text (``{"TRAINER.MAPLE.CTX_INIT": "a photo of a", ...}``); None without a log."""
    for log in _config_logs(path):
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        if "** Config **" not in lines:
            continue
        config: dict[str, str] = {}
        stack: list[str] = []
        for line in lines[lines.index("** Config **") + 1:]:
            if not config and line.startswith("*"):
                continue
            match = _CONFIG_LINE.match(line)
            if match is None:
                break
            depth = len(match.group(1)) // 2
            stack = stack[:depth] + [match.group(2)]
            config[".".join(stack)] = (match.group(3) or "").strip()
        if config:
            return config
    return None


def load_dassl_state(path: Path, model_name: str,
                     epoch: str | None = None) -> tuple[dict[str, torch.Tensor], Path, Any]:
    """(state dict, the file read, its epoch) of a Dassl checkpoint; a bare state dict is accepted too."""
    file = resolve_dassl_file(path, model_name, epoch)
    checkpoint = load_torch_checkpoint(file)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{file} holds a {type(checkpoint).__name__}; expected Dassl's dict with a 'state_dict'")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: 'state_dict' is a {type(state).__name__}; expected a dict of tensors")
    # Dassl strips DataParallel's "module." when saving; a hand-saved state dict may still carry it.
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    return state, file, checkpoint.get("epoch")


def tensor(state: dict[str, Any], key: str, file: Path) -> torch.Tensor:
    """``state[key]`` as finite float32, or a CheckpointError naming the key."""
    value = state[key]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise CheckpointError(f"{file}: {key} is {type(value).__name__}; expected a floating-point tensor")
    if not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        raise CheckpointError(f"{file}: {key} holds {bad} NaN or inf values; expected a trained, finite tensor")
    return value.detach().float()  # official runs are often fp16; import in float32


def check_width(name: str, actual: int, expected: int, what: str, file: Path) -> None:
    if actual != expected:
        raise CheckpointError(f"{file}: {name} has width {actual}, but this model's {what} is {expected}; "
                              "the checkpoint was trained on another backbone")


def require_labels(request: ImportRequest, method: str) -> tuple[str, ...]:
    if request.labels is None:
        raise ConfigError(f"{method} checkpoints do not store class names; pass the labels the prompts were "
                          "trained on (in training order)")
    return tuple(request.labels)


def context_init(request: ImportRequest, file: Path, trainer: str) -> tuple[str | None, str]:
    """(the run's ``TRAINER.<trainer>.CTX_INIT`` or None when it cannot be known, where it was read):
    ``--set ctx_init=...`` first, then the Dassl log of the run; ``_`` becomes a space, as the trainers do."""
    if "ctx_init" in request.options:
        return request.options["ctx_init"].replace("_", " "), "option ctx_init"
    config = run_config(file)
    key = f"TRAINER.{trainer}.CTX_INIT"
    if config is not None and key in config:
        return config[key].replace("_", " "), f"{key} of the run's log.txt"
    return None, "unknown (no ctx_init option, no Dassl log.txt with the run's config)"


def word_init_prefix(request: ImportRequest, file: Path, trainer: str, n_ctx: int) -> tuple[str | None, dict]:
    """CoOp / CoCoOp: with ``CTX_INIT`` set, ``n_ctx = len(ctx_init.split(" "))`` and the prompt prefix is
    the init text (its tokens past ``n_ctx`` stay as words); without it, ``"X" * n_ctx``. An unknown init
    is taken as none: the prompt is the same for every init whose words are one BPE token each."""
    init, source = context_init(request, file, trainer)
    info = {"ctx_init": init, "ctx_init_source": source}
    if not init:
        return None, info
    words = len(init.split(" "))
    if words != n_ctx:
        raise CheckpointError(f"{file}: ctx has {n_ctx} context vectors, but CTX_INIT {init!r} ({source}) has "
                              f"{words} words, and the official prompt learner sets n_ctx to that count; pass the "
                              "ctx_init this checkpoint was trained with")
    return init, info
