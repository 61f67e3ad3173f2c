"""The command line a user meets: one-line errors with exit codes, ``--debug``, help, overrides."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flt_mol import cli
from flt_mol.cli import build_parser, main, parse_args, walk_parsers
from flt_mol.errors import CheckpointError, ConfigError, FltMolError, InputError, UsageError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "emt_is2re_flt.yaml"
OPTIM_RECIPE = ROOT / "recipes" / "optim_flt_gm.yaml"


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """Bad inputs of every kind a user hands over by mistake."""
    out = {
        "missing": tmp_path / "nope.yaml",
        "empty": tmp_path / "empty.bin",
        "empty_yaml": tmp_path / "empty.yaml",
        "bad_yaml": tmp_path / "bad.yaml",
        "text": tmp_path / "notes.txt",
        "dict_ckpt": tmp_path / "dict.pt",
        "lm_ckpt": tmp_path / "lm.pt",
        "is2re_ckpt": tmp_path / "is2re.pt",
        "out": tmp_path / "out",
    }
    out["empty"].write_bytes(b"")
    out["empty_yaml"].write_text("")
    out["bad_yaml"].write_text("task: [is2re\n")
    out["text"].write_text("hello, not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, out["dict_ckpt"])
    for name, task in (("lm_ckpt", "lm"), ("is2re_ckpt", "is2re")):
        torch.save({"version": 1, "config": {"task": task}, "task": {}, "model": {}}, out[name])
    return out


# (argv with {placeholders} from `files`, exit code, words the one line must contain)
BAD_INPUT = [
    (["train", "{missing}", "--out", "{out}"], 2, ["nope.yaml", "does not exist"]),
    (["train", "{empty_yaml}", "--out", "{out}"], 2, ["empty.yaml", "empty"]),
    (["train", "{bad_yaml}", "--out", "{out}"], 2, ["bad.yaml", "not valid YAML", "line"]),
    (["train", str(RECIPE), "--out", "{out}", "model.nonexistent_key=3"], 2, ["model.nonexistent_key"]),
    (["train", str(RECIPE), "--out", "{out}", "run.steps=abc"], 2, ["run.steps", "abc"]),
    (["train", str(RECIPE), "--out", "{out}", "optim.lr=[1"], 2, ["optim.lr", "not valid YAML"]),
    (["evaluate", "{missing}", "--out", "{out}"], 2, ["nope.yaml"]),
    (["evaluate", "{text}", "--out", "{out}"], 1, ["not a flt_mol checkpoint:", "notes.txt", "expected"]),
    (["evaluate", "{empty}", "--out", "{out}"], 1, ["not a flt_mol checkpoint:", "empty.bin", "empty"]),
    (["evaluate", "{dict_ckpt}", "--out", "{out}"], 1, ["not a flt_mol checkpoint:", "dict.pt", "missing"]),
    (["evaluate", "{lm_ckpt}", "--out", "{out}"], 1, ["IS2RE or S2EF checkpoint", "lm.pt", "'lm'"]),
    (["evaluate", "{is2re_ckpt}", "--data", "a", "--split", "x", "y", "--out", "{out}"], 2, ["--split", "2 names"]),
    (["predict", "{text}", "--data", "emt:val_id", "--out", "{out}"], 1, ["not a flt_mol checkpoint:", "notes.txt"]),
    (["predict", "{lm_ckpt}", "--data", "emt:val_id", "--out", "{out}"], 1, ["IS2RE checkpoint", "lm.pt"]),
    (["convert", "{missing}", "{out}"], 2, ["nope.yaml"]),
    (["convert", "{text}", "{out}"], 1, ["notes.txt", "cannot be read"]),
    (["dataset", "build", "val_nope"], 2, ["val_nope", "valid splits"]),
    (["dataset", "info", "--source", "{out}"], 2, ["train.npz"]),
    (["bench", "attention", "--lengths", "0", "--out", "{out}"], 2, ["--lengths"]),
    (["bench", "rpe", "--heads", "0", "--out", "{out}"], 2, ["--heads"]),
    (["bench", "data", "--num-structures", "0"], 2, ["--num-structures"]),
    (["viz", "attention-maps", "{is2re_ckpt}", "--out", "{out}"], 1, ["LM checkpoint", "is2re.pt", "'is2re'"]),
    (["viz", "local-rpe", "--out", "{out}", "--checkpoint", "{empty}"], 1, ["not a flt_mol checkpoint:", "empty.bin"]),
    (["optim", "meta-train", "{missing}", "--out", "{out}"], 2, ["nope.yaml", "does not exist"]),
    (["optim", "meta-train", "{empty_yaml}", "--out", "{out}"], 2, ["empty.yaml", "empty"]),
    (["optim", "meta-train", str(OPTIM_RECIPE), "--out", "{out}", "meta_iterations=abc"], 2, ["meta_iterations"]),
    (["optim", "meta-train", str(OPTIM_RECIPE), "--out", "{out}", "nonexistent_key=1"], 2, ["nonexistent_key"]),
    (["optim", "evaluate", "--checkpoint", "a={text}", "--out", "{out}"], 1, ["not a flt_mol checkpoint:", "notes.txt"]),
    (["optim", "evaluate", "--checkpoint", "a={is2re_ckpt}", "--out", "{out}"], 1, ["is2re.pt", "flt-mol train"]),
    (["optim", "evaluate", "--checkpoint", "{text}", "--out", "{out}"], 2, ["LABEL=PATH"]),
]


def _fill(argv: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]


@pytest.mark.parametrize("argv, code, words", BAD_INPUT, ids=[" ".join(c[0][:2]) for c in BAD_INPUT])
def test_bad_input_is_one_line_on_stderr(argv, code, words, files, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(_fill(argv, files)) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    command = " ".join(a for a in argv[:2] if not a.startswith(("-", "{", "/")) and "=" not in a)
    prog = "flt-mol " + (command if argv[0] in ("dataset", "bench", "viz", "optim") else argv[0])
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_argparse_errors_exit_2_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", str(RECIPE)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: flt-mol train") and "required: --out" in err.strip().splitlines()[-1]
    with pytest.raises(SystemExit) as info:
        main(["train", str(RECIPE), "--out", "x", "optim.lr"])
    assert info.value.code == 2
    assert "unrecognized arguments: optim.lr" in capsys.readouterr().err


def test_debug_shows_the_traceback(files, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    argv = ["evaluate", str(files["text"]), "--out", str(files["out"])]
    for extra, env in (([], "1"), (["--debug"], None)):
        if env is not None:
            monkeypatch.setenv(cli.DEBUG_ENV, env)
        else:
            monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
        assert main([*argv, *extra]) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "CheckpointError" in err
        assert err.strip().splitlines()[-1].startswith("flt-mol evaluate: error: not a flt_mol checkpoint:")
    # --debug before the command works as well.
    assert main(["--debug", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_bugs_keep_their_traceback(monkeypatch):
    """An exception that is not an expected error is re-raised untouched."""
    import flt_mol.train.commands as commands

    def boom(args):
        raise KeyError("a bug")

    monkeypatch.setattr(commands, "cmd_train", boom)
    with pytest.raises(KeyError, match="a bug"):
        main(["train", str(RECIPE), "--out", "x"])


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    import flt_mol.train.commands as commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(commands, "cmd_train", interrupted)
    assert main(["train", str(RECIPE), "--out", "x"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["flt-mol train: interrupted"]


def test_dataset_info_says_where_the_lmdbs_are(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLT_MOL_DATA_DIR", str(tmp_path / "cache"))
    assert main(["dataset", "info"]) == 0
    printed = capsys.readouterr().out
    assert f"LMDB cache: {tmp_path / 'cache' / 'emt_is2re'}" in printed
    for split in ("train", "val_id", "val_ood_ads", "val_ood_cat", "val_ood_both"):
        assert f"{split}.lmdb  (not built yet)" in printed
    assert main(["dataset", "info", "--root", str(tmp_path / "other")]) == 0
    assert str(tmp_path / "other" / "emt_is2re") in capsys.readouterr().out


def test_exit_codes_of_the_error_family():
    assert issubclass(ConfigError, UsageError) and issubclass(CheckpointError, InputError)
    for err_type in (FltMolError, UsageError, ConfigError, InputError, CheckpointError):
        assert issubclass(err_type, ValueError)  # existing `except ValueError` keeps working
    from flt_mol.data.oc20 import OC20FormatError
    from flt_mol.train.config import ConfigError as reexported

    assert reexported is ConfigError and issubclass(OC20FormatError, InputError)
    assert cli.exit_code_for(ConfigError("x")) == 2
    assert cli.exit_code_for(OC20FormatError("x")) == 1
    assert cli.exit_code_for(FileNotFoundError(2, "No such file", "f")) == 2
    assert cli.exit_code_for(PermissionError(13, "Permission denied", "f")) == 1
    assert cli.exit_code_for(ValueError("a bug")) is None
    assert cli.exit_code_for(RuntimeError("a bug")) is None


def test_debug_via_the_installed_entry_point(files):
    """The real process: no traceback by default, one with FLT_MOL_DEBUG=1, exit code 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(cli.DEBUG_ENV, None)
    argv = [sys.executable, "-m", "flt_mol.cli", "train", str(files["missing"]), "--out", str(files["out"])]
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"flt-mol train: error: recipe {files['missing']} does not exist"]
    debug = subprocess.run(argv, capture_output=True, text=True, env={**env, cli.DEBUG_ENV: "1"}, cwd=ROOT)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


# --------------------------------------------------------------------------------------------
# help


def _all_parsers() -> list[argparse.ArgumentParser]:
    return [p for p, _ in walk_parsers(build_parser())]


def test_every_command_and_option_has_help():
    parsers = _all_parsers()
    progs = {p.prog for p in parsers}
    for prog in ("flt-mol train", "flt-mol evaluate", "flt-mol predict", "flt-mol convert", "flt-mol dataset info",
                 "flt-mol bench attention", "flt-mol bench rpe", "flt-mol viz local-rpe", "flt-mol optim meta-train"):
        assert prog in progs
    for parser in parsers:
        assert parser.description, f"{parser.prog} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"


def test_help_shows_defaults_and_required_out():
    by_prog = {p.prog: p for p in _all_parsers()}
    text = " ".join(by_prog["flt-mol bench attention"].format_help().split())  # unwrapped
    assert "batch size B (default: 2)" in text and "(default: 512 1024 2048 4096 8192)" in text
    assert "(default: auto)" in " ".join(by_prog["flt-mol evaluate"].format_help().split())
    for prog in ("flt-mol train", "flt-mol evaluate", "flt-mol predict", "flt-mol optim meta-train"):
        out = next(a for a in by_prog[prog]._actions if "--out" in a.option_strings)
        assert out.required, prog


def test_convert_help_is_plain_text():
    text = next(p for p in _all_parsers() if p.prog == "flt-mol convert").format_help()
    for markup in ("``", ":mod:", ":func:", ":class:"):
        assert markup not in text
    assert "--mode frames" in text


# --------------------------------------------------------------------------------------------
# overrides


@pytest.mark.parametrize("argv", [
    ["train", "R", "a.b=1", "--out", "D", "c=2"],
    ["train", "R", "--out", "D", "a.b=1", "c=2"],
    ["train", "--out", "D", "R", "a.b=1", "c=2"],
    ["optim", "meta-train", "R", "--out", "D", "a.b=1", "c=2"],
    ["optim", "meta-train", "R", "a.b=1", "c=2", "--out", "D"],
    ["optim", "meta-train", "R", "a.b=1", "--out", "D", "c=2"],
])
def test_overrides_go_before_or_after_the_options(argv):
    args = parse_args(build_parser(), argv)
    assert str(args.recipe) == "R" and str(args.out) == "D"
    assert args.overrides == ["a.b=1", "c=2"]


def test_commands_without_overrides_refuse_them(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(build_parser(), ["evaluate", "C", "--out", "x", "a=1"])
    assert info.value.code == 2
    assert "flt-mol evaluate: error: unrecognized arguments: a=1" in capsys.readouterr().err


def test_models_and_data_do_not_know_train_or_the_command_line():
    """models/ raise ConfigError without importing train/; data code does not import the CLI."""
    code = (
        "import sys, flt_mol.models, flt_mol.models.lm, flt_mol.models.vit, flt_mol.data.emt\n"
        "from flt_mol.models.is2re import IS2REModelConfig\n"
        "from flt_mol.errors import ConfigError\n"
        "try:\n"
        "    IS2REModelConfig(attention='nope').validate()\n"
        "except ConfigError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no ConfigError')\n"
        "bad = sorted(m for m in sys.modules if m.startswith('flt_mol.train') or m == 'flt_mol.cli')\n"
        "raise SystemExit(' '.join(bad) or 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
