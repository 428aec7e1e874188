"""The CLI's one vocabulary (issue 21): every option has help and every command examples, one flag per
idea with the old spellings as hidden aliases that say what to use, defaults read from the config
dataclasses, and a public API that loads lazily without torch.

Almost everything here parses or formats help in process; nothing compiles a bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import shlex
import subprocess
import sys

import pytest

from clipfold import cli, errors

OLD_SPELLINGS = ("--k", "--replace", "--target", "--platform", "--kind", "--max-queue-delay-us")
MIB = 1024 * 1024


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every command that runs something (compile, engine build, head add, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _commands(child, path + (name,))


COMMANDS = dict(_commands(cli.build_parser()))


def _visible(parser):
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _parse(*argv):
    return cli.parse_args([str(a) for a in argv])


def _field_default(cls, name):
    found = {f.name: f for f in dataclasses.fields(cls)}[name]
    return found.default_factory() if found.default is dataclasses.MISSING else found.default


def test_the_commands_are_all_there():
    assert set(COMMANDS) == {("compile",), ("engine", "build"), ("fit",), ("head", "add"), ("classify",),
                             ("evaluate",), ("inspect",), ("models",), ("profile",), ("index",), ("search",),
                             ("serve",), ("export", "triton")}


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_option_has_help_and_the_help_has_no_markup(path):
    parser = COMMANDS[path]
    missing = [a.option_strings or a.dest for a in _visible(parser) if not (a.help or "").strip()]
    assert missing == [], f"clipfold {' '.join(path)}: options without help: {missing}"
    text = parser.format_help()
    assert "``" not in text and "%(" not in text


def test_the_top_level_help_has_no_markup_and_examples():
    text = cli.build_parser().format_help()
    assert "``" not in text
    assert "examples:" in text and "clipfold compile " in text


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_help_ends_with_examples_of_itself(path):
    text = COMMANDS[path].format_help()
    assert "examples:" in text, f"clipfold {' '.join(path)} --help has no examples"
    examples = text.split("examples:", 1)[1].strip().splitlines()
    assert 1 <= len(examples) <= 3
    assert any(line.strip().startswith("clipfold " + " ".join(path)) for line in examples), examples
    for line in examples:  # each example parses (with a placeholder bundle/image, nothing runs)
        assert cli.build_parser().parse_args(shlex.split(line)[1:]).func is not None


@pytest.mark.parametrize("group", ["engine", "head", "export"])
def test_a_command_group_help_shows_an_example_of_its_command(group):
    text = cli.build_parser()._subparsers._group_actions[0].choices[group].format_help()
    assert "examples:" in text and f"  clipfold {group} " in text.split("examples:", 1)[1]


def test_the_old_spellings_are_hidden():
    for path, parser in COMMANDS.items():
        visible = {s for a in _visible(parser) for s in a.option_strings}
        assert not visible & set(OLD_SPELLINGS), (path, visible & set(OLD_SPELLINGS))
        assert not any(old + " " in parser.format_help() for old in OLD_SPELLINGS)


def test_one_flag_per_idea_across_commands():
    flags_of: dict[str, set[str]] = {}
    for parser in COMMANDS.values():
        for action in _visible(parser):
            if action.option_strings:
                flags_of.setdefault(action.dest, set()).add(action.option_strings[0])
    assert {dest: flags for dest, flags in flags_of.items() if len(flags) > 1} == {}
    for word in ("--top-k", "--overwrite", "--variant", "--threads", "--json", "--backend", "--max-delay-ms"):
        users = [p for p, parser in COMMANDS.items() if any(word in a.option_strings for a in _visible(parser))]
        assert len(users) >= 2, (word, users)
    where = {a.option_strings[0] for parser in COMMANDS.values() for a in _visible(parser)
             if a.option_strings and a.option_strings[0] in ("--backend", "--device", "--target", "--platform", "--kind")}
    assert where == {"--backend", "--device"}  # the runtime that runs a graph, and the kind of device


OLD_AND_NEW = [  # (command, the old spelling, the new one, the option's value after either)
    (["classify", "b", "x.png"], ["--k", "3"], ["--top-k", "3"], ("top_k", 3)),
    (["search", "idx", "--text", "a"], ["--k", "2"], ["--top-k", "2"], ("top_k", 2)),
    (["head", "add", "b", "--name", "n", "--labels", "a,b"], ["--replace"], ["--overwrite"], ("overwrite", True)),
    (["compile", "--labels", "a", "--out", "o"], ["--target", "tensorrt"], ["--backend", "tensorrt"],
     ("backend", "tensorrt")),
    (["export", "triton", "b", "--out", "o"], ["--platform", "tensorrt"], ["--backend", "tensorrt"],
     ("backend", "tensorrt")),
    (["export", "triton", "b", "--out", "o"], ["--kind", "gpu"], ["--device", "gpu"], ("device", "gpu")),
    (["export", "triton", "b", "--out", "o"], ["--max-queue-delay-us", "2500"], ["--max-delay-ms", "2.5"],
     ("max_delay_ms", 2.5)),
]


@pytest.mark.parametrize("command,old,new,expected", OLD_AND_NEW, ids=lambda v: v if isinstance(v, str) else None)
def test_an_old_spelling_still_works_and_says_what_to_use(command, old, new, expected, capsys):
    dest, value = expected
    by_old = cli.parse_args(command + old)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and old[0] in err and new[0] in err and "old spelling" in err, err
    by_new = cli.parse_args(command + new)
    assert capsys.readouterr().err == ""
    assert getattr(by_old, dest) == getattr(by_new, dest) == value
    assert vars(by_old) == vars(by_new)


def test_the_alias_runs_the_command(capsys, tmp_path):
    # End to end through main(): the old spelling reaches the command (an error naming the bundle proves it ran).
    code = cli.main(["classify", str(tmp_path / "missing.bundle"), str(tmp_path / "x.png"), "--k", "2"])
    err = capsys.readouterr().err.splitlines()
    assert code != 0 and len(err) == 2
    assert err[0].startswith("note: --k is an old spelling") and err[1].startswith("error: ")
    assert "missing.bundle" in err[1]


def test_classify_gives_the_same_answer_by_the_old_and_the_new_spelling(tiny_bundle, tmp_path, capsys):
    from clipfold.compile.tiny import data

    image = tmp_path / "x.png"
    data.generate(1, seed=5)[0].image.save(image)
    assert cli.main(["classify", str(tiny_bundle.path), str(image), "--top-k", "2", "--json"]) == 0
    new = capsys.readouterr()
    assert cli.main(["classify", str(tiny_bundle.path), str(image), "--k", "2", "--json"]) == 0
    old = capsys.readouterr()
    assert new.err == "" and old.err == "note: --k is an old spelling (kept for one release); use --top-k\n"
    assert old.out == new.out and len(json.loads(new.out)[0]["predictions"]) == 2


def test_defaults_come_from_the_config_dataclasses():
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.precision.config import GateConfig, QuantConfig
    from clipfold.compile.profiling.run import ProfileConfig
    from clipfold.compile.tensorrt.build import BatchProfile
    from clipfold.compile.tensorrt.engines import EngineBuildConfig
    from clipfold.compile.triton_server.repository import TritonExportConfig
    from clipfold.runtime.serve.config import ServeConfig

    args = _parse("compile", "--labels", "a", "--out", "o")
    for option, (cls, name) in {"top_k": (CompileConfig, "top_k"), "model": (CompileConfig, "model"),
                                "backend": (CompileConfig, "backend"),
                                "kernel_head_classes": (CompileConfig, "kernel_head_classes"),
                                "calibration": (QuantConfig, "calibration"), "calib_images": (QuantConfig, "calib_images"),
                                "gate_images": (GateConfig, "images"), "gate_min_cosine": (GateConfig, "min_cosine"),
                                "gate_min_top1": (GateConfig, "min_top1_agreement"),
                                "gate_min_top5": (GateConfig, "min_top5_overlap"),
                                "gate_max_accuracy_drop": (GateConfig, "max_accuracy_drop"),
                                "max_batch": (BatchProfile, "max")}.items():
        assert getattr(args, option) == _field_default(cls, name), option
    assert args.precision.split(",") == list(_field_default(CompileConfig, "precisions"))

    args = _parse("serve", "b")
    for name in ("host", "port", "max_batch", "max_delay_ms", "max_queue", "max_image_pixels", "max_items",
                 "timeout_s", "max_text_bytes", "max_header_bytes", "header_timeout_s", "max_connections"):
        assert getattr(args, name) == _field_default(ServeConfig, name), name
    assert args.max_body_mb * MIB == _field_default(ServeConfig, "max_body_bytes")

    args = _parse("export", "triton", "b", "--out", "o")
    assert args.max_delay_ms * 1000 == _field_default(TritonExportConfig, "max_queue_delay_us")
    assert args.backend == _field_default(TritonExportConfig, "platform")
    for name in ("max_batch", "instances", "preprocess_instances"):
        assert getattr(args, name) == _field_default(TritonExportConfig, name), name

    args = _parse("profile", "b")
    assert args.rounds == _field_default(ProfileConfig, "rounds")
    assert args.batch == ",".join(map(str, _field_default(ProfileConfig, "batches")))
    assert args.eager == ",".join(_field_default(ProfileConfig, "eager_modes"))

    args = _parse("engine", "build", "b")
    assert args.workspace_gib == _field_default(EngineBuildConfig, "workspace_gib")
    assert (args.min_batch, args.opt_batch, args.max_batch) == (BatchProfile().min, BatchProfile().opt, BatchProfile().max)


def test_each_command_keeps_its_own_top_k_default_from_the_function_that_owns_it():
    from clipfold.runtime.engine import Engine
    from clipfold.runtime.retrieval.index import Index

    assert _parse("classify", "b", "x.png").top_k == inspect.signature(Engine.classify).parameters["k"].default == 5
    assert _parse("search", "i", "--text", "a").top_k == inspect.signature(Index.search).parameters["k"].default == 10


def test_the_compile_stack_defaults_are_read_too():
    from clipfold.compile.adapters.features import ViewConfig
    from clipfold.compile.adapters.fit import FitConfig
    from clipfold.compile.heads.add import HeadAddConfig

    assert _parse("head", "add", "b", "--name", "n").top_k == _field_default(HeadAddConfig, "top_k")
    args = _parse("fit", "gda", "--support", "s", "--out", "o")
    assert (args.model, args.seed) == (_field_default(FitConfig, "model"), _field_default(FitConfig, "seed"))
    assert (args.views, tuple(args.crop_scale)) == (ViewConfig().views, ViewConfig().crop_scale)


def test_a_changed_config_default_changes_the_cli_default(monkeypatch):
    # The CLI reads the dataclass; it does not repeat its literals.
    from clipfold.runtime.serve.config import ServeConfig

    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    monkeypatch.setattr(fields["port"], "default", 9123)
    monkeypatch.setattr(fields["max_delay_ms"], "default", 1.5)
    args = _parse("serve", "b")
    assert (args.port, args.max_delay_ms) == (9123, 1.5)
    assert "HTTP port (default 9123)" in dict(_commands(cli.build_parser()))[("serve",)].format_help()


def test_the_tensorrt_precision_names_are_decided_by_the_config_not_the_cli():
    from clipfold.cli.compile_cmd import _config
    from clipfold.compile.config import CompileConfig

    api = CompileConfig(labels=("a", "b"), out="o", backend="tensorrt", precisions=("fp16", "int8", "fp8"))
    assert api.precisions == ("fp32", "tensorrt-fp16", "tensorrt-int8", "fp8")
    assert CompileConfig(labels=("a",), out="o", precisions="fp16").precisions == ("fp32", "fp16")
    assert _config(_parse("compile", "--labels", "a,b", "--out", "o", "--backend", "tensorrt",
                          "--precision", "fp16,int8,fp8")).precisions == api.precisions
    with pytest.raises(errors.ConfigError, match="backend tensorrt takes precisions from fp16, int8, fp8"):
        CompileConfig(labels=("a",), out="o", backend="tensorrt", precisions=("int4-weight",))
    with pytest.raises(errors.ConfigError, match="backend 'trt' is not one of onnxruntime, tensorrt"):
        CompileConfig(labels=("a",), out="o", backend="trt")


def test_tensorrt_batch_sizes_without_the_tensorrt_backend_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "x.bundle"
    assert cli.main(["compile", "--labels", "a,b", "--out", str(out), "--max-batch", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "need --backend tensorrt" in err
    assert not out.exists()


def test_the_delay_is_converted_to_microseconds_for_triton(monkeypatch, tmp_path):
    seen = {}
    import clipfold

    def fake_export(config):
        seen["config"] = config
        return tmp_path

    monkeypatch.setattr(clipfold, "export_triton", fake_export, raising=False)
    tmp_bundle = tmp_path / "tiny.bundle"
    assert cli.main(["export", "triton", str(tmp_bundle), "--out", str(tmp_path / "r"), "--max-delay-ms", "2.5",
                     "--device", "gpu", "--backend", "onnxruntime"]) == 0
    config = seen["config"]
    assert (config.max_queue_delay_us, config.kind, config.platform) == (2500, "gpu", "onnxruntime")


def test_import_clipfold_and_its_cli_import_no_torch_and_the_api_is_lazy():
    code = """
import sys
import clipfold
assert "torch" not in sys.modules
expected = {"compile_bundle", "CompileConfig", "QuantConfig", "GateConfig", "fit_adapter", "FitConfig", "add_head",
            "HeadAddConfig", "profile", "ProfileConfig", "export_triton", "TritonExportConfig", "build_index",
            "build_engines", "EngineBuildConfig", "Engine", "ClipfoldError", "serve", "ServeConfig"}
assert expected <= set(clipfold.__all__) <= set(dir(clipfold)), expected - set(clipfold.__all__)
# the runtime names and the configs of torch-free tools load without torch
for name in ("Engine", "build_index", "Index", "evaluate_folder", "ServeConfig", "ProfileConfig",
             "TritonExportConfig", "EngineBuildConfig", "CompileConfig", "QuantConfig", "GateConfig", "ClipfoldError"):
    getattr(clipfold, name)
import clipfold.cli
clipfold.cli.build_parser().format_help()
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_public_names_are_the_deep_ones():
    import clipfold
    from clipfold.compile.adapters.fit import FitConfig, fit_adapter
    from clipfold.compile.heads.add import HeadAddConfig, add_head
    from clipfold.compile.profiling.run import ProfileConfig, profile
    from clipfold.compile.tensorrt.engines import EngineBuildConfig, build_engines
    from clipfold.compile.triton_server.repository import TritonExportConfig, export_triton
    from clipfold.runtime.retrieval.index import build_index

    for obj in (FitConfig, fit_adapter, HeadAddConfig, add_head, ProfileConfig, profile, EngineBuildConfig,
                build_engines, TritonExportConfig, export_triton, build_index):
        assert getattr(clipfold, obj.__name__) is obj
    assert set(clipfold.__all__) == set(clipfold._HOMES) | {"__version__"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        clipfold.nope  # noqa: B018


def test_a_default_with_no_home_is_a_bug_not_a_silent_none():
    from clipfold.cli import options

    with pytest.raises(KeyError):
        _ = options.default("clipfold.runtime.serve.config:ServeConfig", "no_such_field").value
