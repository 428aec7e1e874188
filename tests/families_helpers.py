"""Shared by the families and tokenizer tests: a small SentencePiece-style (Unigram) tokenizer built
with the ``tokenizers`` library, laid out as a Hugging Face tokenizer folder like SigLIP's
(``tokenizer.json`` with a ``$A </s>`` post-processor, ``tokenizer_config.json`` naming the pad token)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = ["a photo of a cat", "a photo of a dog", "the car is red", "an image of the sky", "ünïcödé text and emoji",
          "numbers 123 456", "zero shot classification of many objects", "a bad photo of the big thing"]


def make_unigram_tokenizer(folder: Path, vocab_size: int = 300, tokenizer_class: str = "PreTrainedTokenizerFast") -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": tokenizer_class, "pad_token": "</s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 64}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
