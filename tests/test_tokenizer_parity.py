"""The bundle's tokenizers against open_clip's own (issue 24, item 5 and SigLIP's tokenizer).

CLIP's: the ``tokenizers`` file compile writes, run by the runtime's ``ClipTokenizer``, must give
``open_clip.tokenize``'s ids (open_clip/tokenizer.py, ``SimpleTokenizer.__call__``) for special-token
strings in any case and after HTML unescaping, case-insensitive contractions, combining marks,
prompts, random strings and single code points: a strong sample here, all 1,112,064 in the slow
test (``make test-tokenizer-sweep``). A Hugging Face tokenizer (SigLIP's): the local file set up by
compile, and the runtime's ``PaddedTokenizer`` reading the bundled copy, against open_clip's
``HFTokenizer`` (which runs ``transformers``) on the same folder.
"""

from __future__ import annotations

import random

import numpy as np
import open_clip
import pytest
from open_clip.tokenizer import _clean_canonicalize, _clean_lower, _clean_whitespace

from clipfold.compile.stages.text_tower import write_tokenizer
from clipfold.compile.stages.tokenizer import model_tokenizer
from clipfold.errors import ConfigError
from clipfold.runtime.text_encoder import ClipTokenizer, PaddedTokenizer, clean_text

from .families_helpers import make_unigram_tokenizer

SPECIAL = [
    "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<End_Of_Text>", "a <start_of_text> b", "x<end_of_text>y",
    "&lt;start_of_text&gt;", "&amp;lt;end_of_text&amp;gt;", "&#60;start_of_text&#62;", "&LT;end_of_text&GT;",
    "<start_of_text><end_of_text>", "<<start_of_text>>", "<start_of_text", "start_of_text>", "<ſtart_of_text>",
    "<start_ of_text>", "photo of a <end_of_text> cat", "<START_of_text>!!", "&lt;START_OF_TEXT&gt; dog",
]
CASE = ["it'ſ", "IT'ſ", "IT'S", "we'RE", "they'Ve", "I'M", "you'LL", "he'D", "don'T", "'ſ", "'ſt", "x'Ś",
        "Straße", "ǅemal", "Ǆ", "K-pop", "İstanbul", "ΣΊΣΥΦΟΣ", "ﬁne ﬂag", "ᾼ ᾳ"]
COMBINING = ["\u0345", "a\u0345", "\u0345\u0345x", "ᾳ\u0345", "e\u0301\u0345", "\u0345 \u0345", "\u0300", "a\u0300b",
             "\u0345it's", "\u200d", "a\u200db", "\ufeffword", "\u00ad", "x\u034fy"]
ODD = ["", " ", "\t\n", "Émoji 🐈‍⬛ and ünïcödé", "mojibake Ã©", "日本語のテキスト", "a.b,c;d:e!f?g 12.5%",
       "word " * 100, "ａｂｃ１２３", "١٢٣ arabic", "৩ digits ๓", "\x00\x1f\x7f", "\u2028line\u2029para", "\u1c89\u1c8a",
       "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "🇫🇷🏳️‍🌈", "<b>html</b> &amp;&amp; &quot;q&quot;", "can't won't shan't y'all"]


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    official = open_clip.get_tokenizer("ViT-B-32")
    path = tmp_path_factory.mktemp("clip-tokenizer") / "tokenizer.json"
    write_tokenizer(official, path)
    return ClipTokenizer(path, 77, official.sot_token_id, official.eot_token_id)


def differing(bundled: ClipTokenizer, texts: list[str], chunk: int = 4096) -> list[str]:
    """The texts whose ids differ from open_clip.tokenize's."""
    bad = []
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        ids, _ = bundled(part)
        reference = open_clip.tokenize(part).numpy()
        bad += [t for t, a, b in zip(part, ids, reference) if not np.array_equal(a, b)]
    return bad


@pytest.mark.parametrize("group", ["special", "case", "combining", "odd"])
def test_hand_written_strings_match_open_clip(bundled, group):
    texts = {"special": SPECIAL, "case": CASE, "combining": COMBINING, "odd": ODD}[group]
    assert differing(bundled, texts) == []


def test_special_tokens_become_the_special_ids(bundled):
    """Not only equal to open_clip: the ids are the special ones (what e4645d0 split into pieces)."""
    ids, _ = bundled(["<START_OF_TEXT>", "&lt;end_of_text&gt;"])
    assert ids[0, :3].tolist() == [bundled.start_id, bundled.start_id, bundled.end_id]
    assert ids[1, :3].tolist() == [bundled.start_id, bundled.end_id, bundled.end_id]


def test_prompts_and_random_strings_match_open_clip(bundled):
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    prompts = [t(c) for c in IMAGENET_CLASSNAMES[::20] for t in OPENAI_IMAGENET_TEMPLATES]
    rng = random.Random(0)
    pools = [range(0x20, 0x250), range(0x300, 0x370), range(0x370, 0x530), range(0x3040, 0x30ff),
             range(0x4e00, 0x4e80), range(0x1f300, 0x1f650), range(0x600, 0x700), range(0x2000, 0x2070)]
    pieces = SPECIAL + CASE + COMBINING + ["'s", "'T", " ", "  ", "&amp;", "&lt;"]
    randoms = []
    for _ in range(3000):
        parts = [rng.choice(pieces) if rng.random() < 0.2 else chr(rng.choice(rng.choice(pools)))
                 for _ in range(rng.randint(1, 14))]
        randoms.append("".join(parts))
    assert differing(bundled, prompts + randoms) == []


def sample_code_points() -> list[int]:
    """Every code point below U+3400 (Latin through CJK symbols, with U+0345), every one in blocks
    assigned in Unicode 14-16 (where two regex engines' tables disagree first), and every 37th elsewhere."""
    recent = [(0x0870, 0x08A0), (0x0CF0, 0x0D00), (0x1C80, 0x1C90), (0x1DF00, 0x1E100), (0x10D40, 0x10D90),
              (0x11B00, 0x11B60), (0x11BC0, 0x11C00), (0x11F00, 0x11F60), (0x16D40, 0x16D80), (0x1CC00, 0x1CEC0),
              (0x1E4D0, 0x1E600), (0x1E7E0, 0x1E800), (0x2EBF0, 0x2EE60), (0x31350, 0x31400), (0x1F7D0, 0x1F800)]
    points = set(range(0x3400)) | set(range(0x3400, 0x110000, 37))
    for lo, hi in recent:
        points |= set(range(lo, hi))
    return sorted(p for p in points if not 0xD800 <= p < 0xE000)


def test_a_sample_of_single_code_points_matches_open_clip(bundled):
    points = sample_code_points()
    assert len(points) > 40_000
    assert differing(bundled, [chr(p) for p in points]) == []


@pytest.mark.slow
def test_every_code_point_matches_open_clip(bundled):
    """All 1,112,064 Unicode scalar values, one per string (about 10 minutes on 2 cores)."""
    points = [p for p in range(0x110000) if not 0xD800 <= p < 0xE000]
    assert len(points) == 1_112_064
    assert differing(bundled, [chr(p) for p in points], chunk=16384) == []


@pytest.mark.parametrize("kind, official", [("lower", _clean_lower), ("canonicalize", _clean_canonicalize),
                                            ("whitespace", _clean_whitespace)])
def test_runtime_cleanup_is_open_clips(kind, official):
    texts = SPECIAL + CASE + COMBINING + ODD + ["snake_case_label", "A.B-C/D", "  Mixed   CASE\tWords  "]
    assert [clean_text(t, kind) for t in texts] == [official(t) for t in texts]


# --- a Hugging Face tokenizer (SigLIP) ------------------------------------------------------------

HF_TEXTS = ["a photo of a cat.", "A Photo, of the DOG!!", "word " * 100, "", "ünïcödé_emoji 🐈 &amp;", "x" * 300,
            "snake_case & punctuation: (a) [b] {c}", "numbers 123 456", "  spaced\tout\n"]


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    return make_unigram_tokenizer(tmp_path_factory.mktemp("siglip-tokenizer"))


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "T5Tokenizer"])  # T5: SigLIP's snapshots
def test_local_hf_tokenizer_and_bundled_copy_match_open_clips_hftokenizer(tmp_path, tokenizer_class):
    pytest.importorskip("transformers")
    from open_clip.tokenizer import HFTokenizer

    siglip_folder = make_unigram_tokenizer(tmp_path / "tokenizer", tokenizer_class=tokenizer_class)

    # ViT-B-16-SigLIP's config: context 64, clean "canonicalize" (open_clip/model_configs/ViT-B-16-SigLIP.json)
    official = HFTokenizer(str(siglip_folder), context_length=64, clean="canonicalize")
    reference = official(HF_TEXTS).numpy()
    ours = model_tokenizer("ViT-B-16-SigLIP", siglip_folder)
    assert np.array_equal(ours(HF_TEXTS).numpy(), reference)
    ours.save(tmp_path / "tokenizer.json")
    ids, truncated = PaddedTokenizer(tmp_path / "tokenizer.json", 64, "canonicalize")(HF_TEXTS)
    assert np.array_equal(ids, reference)
    assert truncated.tolist() == [len(official.tokenizer(official.clean_fn(t))["input_ids"]) > 64 for t in HF_TEXTS]


def test_a_tokenizer_json_file_works_like_its_folder(siglip_folder):
    by_folder = model_tokenizer("ViT-B-16-SigLIP", siglip_folder)(HF_TEXTS)
    by_file = model_tokenizer("ViT-B-16-SigLIP", siglip_folder / "tokenizer.json")(HF_TEXTS)
    assert by_folder.shape == (len(HF_TEXTS), 64) and bool((by_folder == by_file).all())


def test_a_hf_tokenizer_model_without_one_is_refused_in_one_line():
    missing = model_tokenizer("ViT-B-16-SigLIP", None)  # no model is built, nothing is downloaded
    with pytest.raises(ConfigError, match=r"timm/ViT-B-16-SigLIP.*--tokenizer") as info:
        missing(["a cat"])
    assert "\n" not in str(info.value)


def test_bad_tokenizer_paths_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        model_tokenizer("ViT-B-16-SigLIP", tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read tokenizer"):
        model_tokenizer("ViT-B-16-SigLIP", tmp_path)
    with pytest.raises(ConfigError, match="CLIP's BPE"):
        model_tokenizer("ViT-B-32", tmp_path)
