"""Shared fixtures: bundles compiled once per session (compiling a real architecture takes ~10 s)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_labels() -> tuple[str, ...]:
    from clipfold.compile.tiny import data

    return tuple(data.class_names())


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny model, loaded once (open_clip model, tokenizer, preprocess, info)."""
    from clipfold.compile.load import load_model

    return load_model("clipfold-tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_labels):
    """The embedded tiny model with its own templates over all colour x shape classes."""
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny.bundle"
    return compile_bundle(CompileConfig(labels=tiny_labels, out=out, top_k=5))


def compile_random(model: str, out, labels=("cat", "dog", "car", "tree", "boat", "house")):
    """A random-weight real architecture; one template keeps the text tower cheap."""
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.pipeline import compile_bundle

    return compile_bundle(CompileConfig(labels=labels, out=out, model=model, templates="label", top_k=3))
