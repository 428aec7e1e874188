"""TaskRes: the imported Dassl checkpoint and the fitted residual both equal the official formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, _LRScheduler

from clipfold import errors
from clipfold.compile.adapters.base import ImportRequest
from clipfold.compile.adapters.taskres import fit_taskres, import_taskres, train_residuals
from clipfold.compile.tiny import data

from .fewshot_helpers import background_task, rel_diff
from .test_coop import write_dassl_log
from .test_gda import _features

LABELS = ("cat", "dog", "car", "tree", "boat")


class ConstantWarmupScheduler(_LRScheduler):
    """Dassl's warm-up scheduler: its state_dict pickles the successor object, as real checkpoints do."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        return self.successor.get_last_lr() if self.last_epoch >= self.warmup_epoch else [self.cons_lr for _ in self.base_lrs]


def official_taskres_logits(f, base, residuals, alpha, logit_scale):
    """CustomCLIP.forward: normalise the image features and (base + alpha * residual), scale, product."""
    f, text = f.double(), base.double() + alpha * residuals.double()
    f = f / f.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return logit_scale * f @ text.t()


def _write_dassl(root, base, residuals, epoch=100, extra=None):
    """output/<...>/prompt_learner/model.pth.tar-<epoch>, as Dassl's save_checkpoint writes it."""
    param = torch.nn.Parameter(residuals.clone())
    optimizer = torch.optim.Adam([param], lr=2e-3)
    scheduler = ConstantWarmupScheduler(optimizer, CosineAnnealingLR(optimizer, 100.0), 1, 1e-5)
    optimizer.step()
    scheduler.step()
    state = {"base_text_features": base, "text_feature_residuals": residuals, **(extra or {})}
    path = root / "prompt_learner" / f"model.pth.tar-{epoch}"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "val_result": None}, path)
    return path


def _checkpoint_tensors(classes=len(LABELS), dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = 8.0 * torch.randn(classes, dim, generator=g)  # unnormalised, as the official mean of prompt embeddings
    return base, 0.5 * torch.randn(classes, dim, generator=g)


def _request(tiny, path, labels=LABELS, **options):
    return ImportRequest(checkpoint=path, loaded=tiny, labels=labels, templates=("{}",), options=options)


@pytest.mark.parametrize("alpha, source", [(None, "file"), ("1.0", "file"), (None, "folder"), (None, "log")])
def test_import_matches_the_official_formula(tiny, tmp_path, alpha, source):
    base, residuals = _checkpoint_tensors()
    path = _write_dassl(tmp_path, base, residuals)
    if source == "log":  # scripts/taskres/main.sh passes TRAINER.TaskRes.RESIDUAL_SCALE ${SCALE}; Flowers: 1.0
        write_dassl_log(tmp_path, "TaskRes", {"ENHANCED_BASE": "none", "RESIDUAL_SCALE": 1.0})
    checkpoint = tmp_path if source in ("folder", "log") else path  # Dassl's output folder is accepted
    imported = import_taskres(_request(tiny, checkpoint, **({"alpha": alpha} if alpha else {})))
    # the scripts' 0.5 without an option or a logged RESIDUAL_SCALE (scripts/taskres/*.sh)
    a = float(alpha) if alpha else (1.0 if source == "log" else 0.5)
    assert imported.hyperparameters["alpha"] == a and imported.hyperparameters["epoch"] == 100
    assert imported.source == path
    scale = float(tiny.model.logit_scale.detach().exp())
    g = torch.Generator().manual_seed(1)
    random_f = F.normalize(torch.randn(64, 64, generator=g), dim=-1)
    real_f, _ = _features(tiny, data.generate(32, seed=3))
    for f in (random_f, real_f):
        reference = official_taskres_logits(f, base, residuals, a, scale)
        for logits in (imported.head.logits(f), imported.head.fold().logits(f)):
            assert rel_diff(logits, reference) <= 1e-5, rel_diff(logits, reference)
            assert torch.equal(logits.topk(3).indices, reference.topk(3).indices)
    # alpha matters: the other value gives other logits.
    other = official_taskres_logits(random_f, base, residuals, 1.5 - a, scale)
    assert rel_diff(imported.head.logits(random_f), other) > 1e-3


def test_plain_state_dict_checkpoint_is_accepted(tiny, tmp_path):
    base, residuals = _checkpoint_tensors()
    torch.save({"state_dict": {"base_text_features": base, "text_feature_residuals": residuals}, "epoch": 5},
               tmp_path / "model-best.pth.tar")
    imported = import_taskres(_request(tiny, tmp_path / "model-best.pth.tar"))
    assert "ignored_objects" not in imported.hyperparameters and imported.labels == LABELS


@pytest.mark.parametrize("state, labels, error, pattern", [
    ({"weight": torch.zeros(5, 64)}, LABELS, errors.CheckpointError,
     r"missing keys \['base_text_features', 'text_feature_residuals'\].*found \['weight'\]"),
    ("wide", LABELS, errors.CheckpointError, r"shape \(5, 512\), but clipfold-tiny embeds in 64 dims"),
    ("nan", LABELS, errors.CheckpointError, r"text_feature_residuals holds NaN"),
    ("ok", LABELS[:3], errors.ConfigError, r"3 labels given, but the checkpoint has 5 classes"),
    ("ok", None, errors.ConfigError, r"pass --labels with 5 classes"),
])
def test_bad_checkpoints_are_refused(tiny, tmp_path, state, labels, error, pattern):
    base, residuals = _checkpoint_tensors()
    if state == "wide":
        base, residuals = _checkpoint_tensors(dim=512)
    if state == "nan":
        residuals[2, 3] = float("nan")
    if isinstance(state, dict):
        torch.save({"state_dict": state, "epoch": 1}, tmp_path / "m.pth.tar")
        path = tmp_path / "m.pth.tar"
    else:
        path = _write_dassl(tmp_path, base, residuals)
    with pytest.raises(error, match=pattern):
        import_taskres(_request(tiny, path, labels=labels))


def test_bad_alpha_option(tiny, tmp_path):
    path = _write_dassl(tmp_path, *_checkpoint_tensors())
    with pytest.raises(errors.ConfigError, match=r"alpha='big' is not a number"):
        import_taskres(_request(tiny, path, alpha="big"))


def reference_training(views, labels, base, alpha, scale, seed, epochs, lr=2e-3):
    """The official loop on features, written out: Adam(wd 5e-4), constant warm-up epoch, cosine by epoch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros_like(base, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr, weight_decay=5e-4, betas=(0.9, 0.999))
    e, n, _ = views.shape
    for epoch in range(epochs):
        opt.param_groups[0]["lr"] = 1e-5 if epoch == 0 else lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
        view = 1 + torch.randint(e - 1, (n,), generator=g)  # an augmented view of each shot
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 256):
            i = perm[s:s + 256]
            text = base + alpha * x
            logits = scale * views[view[i], i] @ (text / text.norm(dim=-1, keepdim=True)).t()
            loss = F.cross_entropy(logits, labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return x.detach()


def test_training_follows_the_official_recipe():
    g = torch.Generator().manual_seed(0)
    classes, dim, n = 4, 16, 300  # 300 shots: two batches of 256 per epoch
    labels = torch.arange(n) % classes
    views = F.normalize(torch.randn(3, n, dim, generator=g) + F.one_hot(labels, dim).float(), dim=-1)
    base = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    ours = train_residuals(views, labels, base, 0.5, 100.0, seed=3, epochs=12)
    ref = reference_training(views.double(), labels, base.double(), 0.5, 100.0, seed=3, epochs=12)
    assert ours.abs().max() > 1e-3  # it trained
    assert rel_diff(ours, ref) <= 1e-5, rel_diff(ours, ref)


def test_fit_beats_zero_shot_and_records_its_choice(tiny):
    zero_shot, support, test_f, test_y = background_task(tiny)
    fitted = fit_taskres(support)
    hyper = fitted.hyperparameters
    assert hyper["alpha"] in (0.5, 1.0) and set(hyper["val_accuracy_by_alpha"]) == {"0.5", "1.0"}
    assert hyper["val_accuracy"] == max(hyper["val_accuracy_by_alpha"].values())
    zs = float((zero_shot.logits(test_f).argmax(1) == test_y).float().mean())
    adapted = float((fitted.head.logits(test_f).argmax(1) == test_y).float().mean())
    assert adapted >= zs + 0.05, (zs, adapted)
    again = fit_taskres(support)  # deterministic for a seed
    assert torch.equal(again.head.linears[0].weight, fitted.head.linears[0].weight)
