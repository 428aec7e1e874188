"""CoOp import: the prompt text tower, the official formula (float64 reference), Dassl checkpoints."""

from __future__ import annotations

import collections
import copy

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipfold import errors
from clipfold.compile.adapters.base import ImportRequest
from clipfold.compile.adapters.coop import import_coop
from clipfold.compile.adapters.prompt_text import PromptTextTower
from clipfold.compile.stages.verify import encode_pixels
from clipfold.compile.tiny import data
from clipfold.runtime.preprocess import preprocess

LABELS = ("red circle", "green_square", "blue triangle", "yellow star", "purple cross")


def write_dassl_checkpoint(folder, model_name, state, epoch=50, best=False):
    """What Dassl's ``save_checkpoint`` writes: ``<folder>/<model_name>/model.pth.tar-<epoch>`` holding
    the state dict, the epoch, the optimizer's state dict and the warmup scheduler's state dict, which
    holds its successor scheduler *object* (Dassl's ``_BaseWarmupScheduler`` keeps it as an attribute)."""
    param = torch.nn.Parameter(torch.zeros(2, 3))
    optim = torch.optim.SGD([param], lr=0.002, momentum=0.9, weight_decay=5e-4)
    param.sum().backward()
    optim.step()  # momentum buffers: the optimizer state is a defaultdict, as after training
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=epoch)
    scheduler = {"successor": successor, "warmup_epoch": 1, "cons_lr": 1e-5, "base_lrs": [0.002],
                 "last_epoch": epoch, "_step_count": epoch + 1, "_last_lr": [1e-5]}
    path = folder / model_name / ("model-best.pth.tar" if best else f"model.pth.tar-{epoch}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": collections.OrderedDict(state), "epoch": epoch, "optimizer": optim.state_dict(),
                "scheduler": scheduler, "val_result": None}, path)
    return path


def rel_diff(ours, reference):
    return float((ours.detach().double() - reference.detach()).abs().max() / reference.detach().abs().max())


def real_features(loaded, n=12, seed=7):
    pixels = preprocess([s.image for s in data.generate(n, seed=seed)], loaded.preprocess)
    return encode_pixels(loaded.model, loaded.preprocess, pixels)


def random_unit(n, dim, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def write_dassl_log(folder, trainer, fields, name="log.txt"):
    """``<output>/log.txt`` as Dassl's train.py writes it: ``print_args`` prints the arguments, a
    ``** Config **`` banner and ``print(cfg)``; yacs' ``CfgNode.__str__`` writes ``KEY: value`` (strings
    unquoted, an empty string as ``KEY: ``) sorted, nested nodes as ``KEY:`` indented two spaces."""
    body = ["DATASET:", "  NAME: Caltech101", "  NUM_SHOTS: 16", "OPTIM:", "  LR: 0.0035", "TRAINER:",
            f"  {trainer}:"] + [f"    {k}: {v}" for k, v in sorted(fields.items())] + ["  NAME: " + trainer]
    text = ["***************", "** Arguments **", "***************", "config_file: configs/trainers/x.yaml",
            "************", "** Config **", "************", *body, "Collecting env info ...",
            "** System info **", "PyTorch version: 1.9.0"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(text) + "\n")


def word_embeddings(loaded, words):
    """The token embeddings of ``words`` (each one BPE token), as CoOp's ctx_init does."""
    tokens = loaded.tokenizer([words])[0]
    n = len(words.split())
    return loaded.model.token_embedding(tokens[1:1 + n]).detach()


# --- the official formula, transcribed from trainers/coop.py in float64 ----------------------------
class OfficialCoOp:
    def __init__(self, loaded, classnames, ctx, position, ctx_init=""):
        self.clip = copy.deepcopy(loaded.model).double().eval()
        tokenizer = open_clip.tokenizer._tokenizer
        n_ctx = ctx.shape[-2]
        if ctx_init:  # PromptLearner: n_ctx = len(ctx_init.split(" ")), prompt_prefix = ctx_init
            ctx_init = ctx_init.replace("_", " ")
            assert n_ctx == len(ctx_init.split(" "))
            prompt_prefix = ctx_init
        else:
            prompt_prefix = " ".join(["X"] * n_ctx)
        classnames = [name.replace("_", " ") for name in classnames]
        self.name_lens = [len(tokenizer.encode(name)) for name in classnames]
        prompts = [prompt_prefix + " " + name + "." for name in classnames]
        self.tokenized = loaded.tokenizer(prompts)
        with torch.no_grad():
            embedding = self.clip.token_embedding(self.tokenized)
        self.prefix, self.suffix = embedding[:, :1, :], embedding[:, 1 + n_ctx:, :]
        self.ctx, self.n_ctx, self.n_cls, self.position = ctx.double(), n_ctx, len(classnames), position

    def prompts(self):
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        if self.position == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        out = []
        for i in range(self.n_cls):
            name_len = self.name_lens[i]
            prefix_i, class_i = self.prefix[i:i + 1], self.suffix[i:i + 1, :name_len]
            suffix_i = self.suffix[i:i + 1, name_len:]
            if self.position == "middle":
                half = self.n_ctx // 2
                out.append(torch.cat([prefix_i, ctx[i:i + 1, :half], class_i, ctx[i:i + 1, half:], suffix_i], dim=1))
            else:
                out.append(torch.cat([prefix_i, class_i, ctx[i:i + 1], suffix_i], dim=1))
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def text_features(self, prompts):
        clip = self.clip
        x = prompts + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)  # open_clip's transformer is batch-first
        x = clip.ln_final(x)
        return x[torch.arange(x.shape[0]), self.tokenized.argmax(dim=-1)] @ clip.text_projection

    @torch.no_grad()
    def logits(self, image_features):
        image_features = image_features.double()
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text = self.text_features(self.prompts())
        text = text / text.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * image_features @ text.t()


def test_text_tower_on_word_embeddings_equals_encode_text(tiny):
    tower = PromptTextTower(tiny.model)
    tokens = tiny.tokenizer(["X X X X red circle.", "X X X X blue square."])
    embedded = tower.embed_tokens(tokens)
    embedded[:, 1:5] = word_embeddings(tiny, "a photo of a")
    with torch.no_grad():
        ours = tower(embedded, tower.pool_index(tokens))
        reference = tiny.model.encode_text(tiny.tokenizer(["a photo of a red circle.", "a photo of a blue square."]))
    assert rel_diff(ours, reference.double()) <= 1e-6


def _custom_text_clip():
    torch.manual_seed(0)
    return open_clip.model.CustomTextCLIP(
        16, {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}).eval()


def test_text_tower_of_a_custom_text_clip_equals_encode_text(tiny):
    model = _custom_text_clip()
    tower = PromptTextTower(model)
    tokens = tiny.tokenizer(["X X X X red circle."])
    embedded = tower.embed_tokens(tokens)
    embedded[:, 1:5] = model.text.token_embedding(tiny.tokenizer(["a photo of a"])[0, 1:5]).detach()
    with torch.no_grad():
        ours = tower(embedded, tower.pool_index(tokens))
        reference = model.encode_text(tiny.tokenizer(["a photo of a red circle."]))
    assert rel_diff(ours, reference.double()) <= 1e-6


def test_text_tower_refuses_unknown_models():
    with pytest.raises(errors.ConfigError, match="not Linear"):
        PromptTextTower(torch.nn.Linear(2, 2))
    model = _custom_text_clip()
    model.text = torch.nn.Identity()  # stands in for an HF text model
    with pytest.raises(errors.ConfigError, match="not CustomTextCLIP with text tower Identity"):
        PromptTextTower(model)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_matches_the_official_formula(tiny, tmp_path, position, csc):
    g = torch.Generator().manual_seed(1)
    base = word_embeddings(tiny, "a photo of a")
    ctx = base + 0.05 * torch.randn(base.shape, generator=g)
    if csc:
        ctx = ctx.unsqueeze(0) + 0.05 * torch.randn(len(LABELS), *base.shape, generator=g)
    reference_model = OfficialCoOp(tiny, LABELS, ctx, position)
    state = {"ctx": ctx, "token_prefix": reference_model.prefix.float(), "token_suffix": reference_model.suffix.float()}
    write_dassl_checkpoint(tmp_path, "prompt_learner", state)
    imported = import_coop(ImportRequest(tmp_path, tiny, LABELS, (), {"class_token_position": position}))
    assert imported.labels == LABELS and imported.head.method == "coop"
    assert imported.hyperparameters["csc"] is csc and imported.hyperparameters["n_ctx"] == 4
    assert imported.hyperparameters["epoch"] == 50
    for f in (random_unit(40, tiny.info.embed_dim), real_features(tiny)):
        reference = reference_model.logits(f)
        for logits in (imported.head.logits(f), imported.head.fold().logits(f)):
            assert rel_diff(logits, reference) <= 1e-5
            assert torch.equal(logits.topk(2).indices, reference.topk(2).indices)


@pytest.mark.parametrize("source", ["log", "option"])
def test_init_words_of_several_tokens_stay_in_the_prompt(tiny, tmp_path, source):
    """CTX_INIT "a clipfold photo of" is 4 words (n_ctx 4) but 5 BPE tokens: the official prompt is
    "a clipfold photo of {name}." with tokens 1..4 replaced, so the token "of" stays before the name."""
    init = "a clipfold photo of"
    g = torch.Generator().manual_seed(4)
    ctx = word_embeddings(tiny, "a photo of a") + 0.05 * torch.randn(4, 64, generator=g)
    write_dassl_checkpoint(tmp_path, "prompt_learner", {"ctx": ctx})
    options = {"ctx_init": init.replace(" ", "_")} if source == "option" else {}
    if source == "log":
        write_dassl_log(tmp_path, "COOP", {"N_CTX": 16, "CTX_INIT": init, "CSC": False,
                                           "CLASS_TOKEN_POSITION": "middle"})
    imported = import_coop(ImportRequest(tmp_path, tiny, LABELS, (), options))
    position = "middle" if source == "log" else "end"  # the run's CLASS_TOKEN_POSITION when logged
    assert imported.hyperparameters["ctx_init"] == init
    assert imported.hyperparameters["class_token_position"] == position
    f = real_features(tiny)
    reference = OfficialCoOp(tiny, LABELS, ctx, position, ctx_init=init).logits(f)
    assert rel_diff(imported.head.logits(f), reference) <= 1e-5
    assert rel_diff(OfficialCoOp(tiny, LABELS, ctx, position).logits(f), reference) > 1e-3  # the words matter
    with pytest.raises(errors.CheckpointError, match=r"ctx has 4 context vectors, but CTX_INIT 'a photo' .* has 2 words"):
        import_coop(ImportRequest(tmp_path, tiny, LABELS, (), {"ctx_init": "a photo"}))


def test_positions_differ_and_the_best_checkpoint_is_preferred(tiny, tmp_path):
    """A test of the splicing: the three positions give different heads; the file chosen is Dassl's."""
    ctx = word_embeddings(tiny, "a photo of a")
    write_dassl_checkpoint(tmp_path, "prompt_learner", {"ctx": ctx + 1.0}, epoch=10)
    write_dassl_checkpoint(tmp_path, "prompt_learner", {"ctx": ctx}, best=True)
    heads = {p: import_coop(ImportRequest(tmp_path, tiny, LABELS, (), {"class_token_position": p})).head
             for p in ("end", "middle", "front")}
    assert not torch.allclose(heads["end"].linears[0].weight, heads["middle"].linears[0].weight, atol=1e-3)
    assert not torch.allclose(heads["end"].linears[0].weight, heads["front"].linears[0].weight, atol=1e-3)
    # model-best.pth.tar holds the word embeddings: "a photo of a {name}." exactly
    with torch.no_grad():
        prompts = [f"a photo of a {n.replace('_', ' ')}." for n in LABELS]
        text = F.normalize(tiny.model.encode_text(tiny.tokenizer(prompts)), dim=-1)
    scale = tiny.model.logit_scale.exp()
    assert rel_diff(heads["end"].linears[0].weight, (scale * text).double()) <= 1e-5
    epoch10 = import_coop(ImportRequest(tmp_path, tiny, LABELS, (), {"epoch": "10"}))
    assert epoch10.hyperparameters["checkpoint"] == "model.pth.tar-10"


def test_pickled_code_in_a_checkpoint_never_runs(tiny, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"ctx": word_embeddings(tiny, "a photo of a")}, "epoch": 1, "payload": Payload()}, path)
    imported = import_coop(ImportRequest(path, tiny, LABELS, (), {}))
    assert imported.head.num_classes == len(LABELS)
    assert not marker.exists()


def _request(tiny, tmp_path, state, labels=LABELS, options=None):
    path = write_dassl_checkpoint(tmp_path, "prompt_learner", state)
    return ImportRequest(path, tiny, labels, (), options or {})


@pytest.mark.parametrize("state, labels, options, error, pattern", [
    ({"weight": torch.zeros(3, 64)}, LABELS, {}, errors.CheckpointError,
     r"not a CoOp checkpoint: missing keys \['ctx'\]; expected \['ctx'\]; found \['weight'\]"),
    ({"ctx": torch.zeros(4, 512)}, LABELS, {}, errors.CheckpointError,
     r"ctx has width 512, but this model's text width is 64"),
    ({"ctx": torch.full((4, 64), float("nan"))}, LABELS, {}, errors.CheckpointError, r"ctx holds 256 NaN or inf"),
    ({"ctx": torch.zeros(3, 4, 64)}, LABELS, {}, errors.CheckpointError, r"has 3 classes, but 5 labels were given"),
    ({"ctx": torch.zeros(4, 64)}, None, {}, errors.ConfigError, r"do not store class names"),
    ({"ctx": torch.zeros(4, 64)}, LABELS, {"class_token_position": "left"}, errors.ConfigError,
     r"class_token_position='left' is not one of end, middle, front"),
    ({"ctx": torch.zeros(30, 64)}, LABELS, {}, errors.ConfigError, r"do not fit the text context of 32 tokens"),
])
def test_bad_checkpoints_are_refused(tiny, tmp_path, state, labels, options, error, pattern):
    with pytest.raises(error, match=pattern):
        import_coop(_request(tiny, tmp_path, state, labels, options))


def test_missing_checkpoint_directory_names_what_it_expected(tiny, tmp_path):
    (tmp_path / "prompt_learner").mkdir()
    (tmp_path / "prompt_learner" / "notes.txt").write_text("x")
    with pytest.raises(errors.CheckpointError, match=r"model-best.pth.tar or prompt_learner/model.pth.tar-<epoch>; "
                                                     r"found \['notes.txt'\]"):
        import_coop(ImportRequest(tmp_path, tiny, LABELS, (), {}))


def test_real_features_are_real(tiny):
    """Guard for the tests above: the image features are unit rows that differ per image."""
    f = real_features(tiny)
    assert np.allclose(f.norm(dim=-1).numpy(), 1.0, atol=1e-5) and float(torch.pdist(f).min()) > 1e-3
