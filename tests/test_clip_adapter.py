"""CLIP-Adapter: the official Dassl checkpoint imported, trained on cached features, exported."""

from __future__ import annotations

import pytest
import torch

from clipfold import errors
from clipfold.compile.adapters import clip_adapter
from clipfold.compile.adapters.base import ImportRequest, Support
from clipfold.compile.config import CompileConfig
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.tiny import data

from .engine_parity import assert_engine_matches
from .test_gda import BACKGROUNDS, _features, _shots

LABELS = tuple(f"{b}_background" for b in BACKGROUNDS)  # underscores, as dataset class names often have
TEMPLATE = "a photo on a {}."


class OfficialAdapter(torch.nn.Module):
    """clip_adapter.Adapter: the official module, state-dict names fc.0.weight / fc.2.weight."""

    def __init__(self, c_in, reduction=4):
        super().__init__()
        self.fc = torch.nn.Sequential(torch.nn.Linear(c_in, c_in // reduction, bias=False), torch.nn.ReLU(),
                                      torch.nn.Linear(c_in // reduction, c_in, bias=False), torch.nn.ReLU())

    def forward(self, x):
        return self.fc(x)


def official_logits(model, tokenizer, adapter, image, template=TEMPLATE):
    """CustomCLIP.forward on normalized pixels: the adapter reads the *unnormalized* feature; TextEncoder
    formats CUSTOM_TEMPLATES[cfg.DATASET.NAME] ('a photo of a {}.' for ImageNet, Caltech101, SUN397, Cars)."""
    image_features = model.encode_image(image)
    x = adapter(image_features)
    image_features = 0.2 * x + 0.8 * image_features
    prompts = [template.format(c.replace("_", " ")) for c in LABELS]
    text_features = model.encode_text(tokenizer(prompts))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_features @ text_features.t()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    adapter = OfficialAdapter(64)
    with torch.no_grad():  # large enough to move predictions, so the check is not vacuous
        for p in adapter.parameters():
            p.mul_(4.0)
    path = tmp_path_factory.mktemp("clip_adapter") / "model.pth.tar-200"
    torch.save({"state_dict": adapter.state_dict(), "epoch": 200, "optimizer": None}, path)
    return adapter, path


def test_imported_checkpoint_compiles_to_the_official_formula(tiny, checkpoint, tmp_path):
    adapter, path = checkpoint
    result = compile_bundle(CompileConfig(labels=LABELS, adapter=path, method="clip-adapter", templates=(TEMPLATE,),
                                          out=tmp_path / "b", top_k=3))
    head = result.manifest.head
    assert head.method == "clip-adapter" and head.adapter["imported"] and head.adapter["hyperparameters"]["ratio"] == 0.2
    assert_engine_matches(result.path, tiny.preprocess,
                          lambda x: official_logits(tiny.model, tiny.tokenizer, adapter, x))


def test_dassl_folder_and_the_official_template_by_default(tiny, checkpoint, tmp_path):
    """Dassl's output folder (``<out>/clip_adapter/model.pth.tar-200``) is accepted, and without --templates
    the head uses the official single template, not the model's default ensemble."""
    adapter, path = checkpoint
    folder = tmp_path / "output" / "seed1"
    (folder / "clip_adapter").mkdir(parents=True)
    (folder / "clip_adapter" / "model.pth.tar-200").write_bytes(path.read_bytes())
    result = compile_bundle(CompileConfig(labels=LABELS, adapter=folder, method="clip-adapter", out=tmp_path / "b",
                                          top_k=3))
    head = result.manifest.head
    assert tuple(head.templates) == ("a photo of a {}.",)
    assert head.adapter["hyperparameters"]["epoch"] == 200 and head.adapter["file"] == "model.pth.tar-200"
    assert_engine_matches(result.path, tiny.preprocess,
                          lambda x: official_logits(tiny.model, tiny.tokenizer, adapter, x, "a photo of a {}."))


def test_unknown_layout_and_width_mismatch_are_refused(tiny, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"adapter.weight": torch.zeros(3)}}, bad)
    request = ImportRequest(bad, tiny, LABELS, (TEMPLATE,))
    with pytest.raises(errors.CheckpointError, match=r"missing keys.*fc\.0\.weight.*found \['adapter\.weight'\]"):
        clip_adapter.import_clip_adapter(request)
    torch.save({"state_dict": OfficialAdapter(1024).state_dict()}, bad)
    with pytest.raises(errors.CheckpointError, match="1024-dim features.*64-dim"):
        clip_adapter.import_clip_adapter(request)
    torch.save({"state_dict": OfficialAdapter(64).state_dict()}, bad)
    with pytest.raises(errors.ConfigError, match="class names"):
        clip_adapter.import_clip_adapter(ImportRequest(bad, tiny, None, (TEMPLATE,)))


def test_fit_on_cached_features_adapts(tiny):
    labels = [f"{b} background" for b in BACKGROUNDS]
    text = build_zero_shot_head(tiny.model, tiny.tokenizer, labels, (TEMPLATE, "a {}.")).class_embeddings
    shots_f, shots_y = _features(tiny, _shots(16, 11))
    test_f, test_y = _features(tiny, data.generate(300, seed=4243))
    fitted = clip_adapter.fit_clip_adapter(Support(shots_f, shots_y, test_f[:0], test_y[:0], text,
                                                   float(tiny.model.logit_scale.exp())))
    zero_shot = float(((test_f @ text.T).argmax(1) == test_y).float().mean())
    adapted = float((fitted.head.logits(test_f).argmax(1) == test_y).float().mean())
    assert fitted.head.transform is not None and fitted.hyperparameters["epochs"] == clip_adapter.EPOCHS
    assert adapted > zero_shot, (zero_shot, adapted)
