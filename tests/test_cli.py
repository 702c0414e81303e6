"""The command line's conventions: help (placeholders, flags, defaults, -h, --version), one option
name per idea, exit code 2 for every usage error (before the heavy imports), `teachers` on stdout,
and paths and messages printed verbatim (no rich markup, no emoji codes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trt_relabel import __version__
from trt_relabel.cli import main

BIN = Path(sys.executable).parent
COMMANDS = ("teachers", "build-engine", "generate", "train", "import-relabel", "export-relabel", "merge", "show",
            "stats", "audit", "bench", "sample-images")  # fmt: skip


def run_main(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["trt-relabel", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def run_cli(*args: object, columns: int = 80, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COLUMNS": str(columns), "TERMINAL_WIDTH": str(columns), **env}
    command = [BIN / "trt-relabel", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """`trt-relabel COMMAND -h` of every command (and `trt-relabel -h`), 200 columns wide."""
    texts = {}
    for command in ("", *COMMANDS):
        done = run_cli(*([command] if command else []), "-h", columns=200)
        assert done.returncode == 0, done.stderr
        texts[command] = done.stdout
    return texts


def test_help_follows_the_click_conventions(helps):
    for command, text in helps.items():
        assert not re.search(r"<(bool|path|int|str|float|list)|\{[a-z_]+\}|\(default:", text), (command, text)
        assert "-h" in text and "--help" in text
    usage = {command: next(line for line in text.splitlines() if "Usage:" in line).split("Usage:")[1].strip()
             for command, text in helps.items()}  # fmt: skip
    assert usage["generate"] == "trt-relabel generate [OPTIONS] DATA"
    assert usage["import-relabel"] == "trt-relabel import-relabel [OPTIONS] RELABEL_ROOT"
    assert usage["show"] == "trt-relabel show [OPTIONS] [IMAGE]"
    assert usage["merge"] == "trt-relabel merge [OPTIONS] STORES..."
    assert usage["stats"] == "trt-relabel stats [OPTIONS] STORE"
    generate = helps["generate"]
    assert re.search(r"\* +--out +-o +STORE +Label store directory .*\[required\]", generate)
    assert re.search(r"--compile +torch backend", generate)  # a flag shows no type
    assert re.search(r"--size +S \[x>=32\] .*\[default: the teacher's\]", generate)
    assert "--engines-dir" in helps["build-engine"] and "--out" not in helps["build-engine"]
    for command in ("generate", "bench", "train", "import-relabel", "export-relabel"):
        assert re.search(r"--workers +-j ", helps[command]), command


def test_train_help_shows_the_recipe_defaults(helps):
    """Every `[default: X]` of train's help is TrainConfig's default (the options override a recipe)."""
    from trt_relabel.train_config import TrainConfig

    shown = dict(re.findall(r"--([a-z-]+)[^\n]*?\[default: ([^\]]+)\]", helps["train"]))
    assert {"model", "epochs", "batch-size", "image-size", "lr", "label-mode", "workers"} <= set(shown)
    defaults = TrainConfig()
    for option, text in shown.items():
        value = getattr(defaults, option.replace("-", "_"))
        if isinstance(value, bool):
            assert text.startswith("on" if value else "no-"), option
        else:
            assert text == str(value), option


def test_version_and_dash_h(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "--version")
    assert (code, out) == (0, f"trt-relabel {__version__}\n")
    code, out, _ = run_main(monkeypatch, capsys, "stats", "-h")
    assert code == 0 and "stats [OPTIONS] STORE" in out


@pytest.mark.parametrize(
    "args",
    [
        ("generate", "data", "--out", "s", "--topk", "0"),
        ("generate", "data", "--out", "s", "--size", "16"),
        ("generate", "data", "--out", "s", "--batch-size", "0"),
        ("build-engine", "--topk", "0"),
        ("generate", "data", "--out", "s", "--device", "gpu1"),
        ("build-engine", "--device", "cuda:x"),
        ("bench", "data", "--device", "cuda:"),
        ("merge", "a", "b", "--out", "m", "--topk", "0"),
    ],
)
def test_option_range_errors_exit_2_before_heavy_imports(args, tmp_path):
    """Out-of-range numbers are refused by the parser: exit 2, one error, and torch never imported."""
    script = (
        "import sys\nfrom trt_relabel.cli import main\n"
        f"sys.argv = ['trt-relabel', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "Invalid value" in done.stderr


def test_build_engine_refuses_the_cpu_device(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "build-engine", "--device", "cpu", "--engines-dir", tmp_path / "e")
    assert code == 2 and err.count("\n") == 1 and "builds on a CUDA GPU" in err, err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("teacher", "suggestion"),
    [("effnet_lite0", "did you mean 'efficientnet_lite0'?"), ("timm:resnet5", "did you mean 'timm:resnet50'")],
)
def test_unknown_teacher_is_a_usage_error_with_a_suggestion(image_folder, tmp_path, monkeypatch, capsys, teacher,
                                                            suggestion):  # fmt: skip
    out = tmp_path / "store"
    code, _, err = run_main(monkeypatch, capsys, "generate", image_folder, "--out", out, "--teacher", teacher)
    assert code == 2 and err.count("\n") == 1 and suggestion in err, err
    assert not out.exists()


def test_teachers_on_stdout_whole_at_80_columns_and_as_json(monkeypatch, capsys):
    from trt_relabel.teacher import TEACHERS

    piped = run_cli("teachers", columns=80)
    assert piped.returncode == 0 and piped.stderr == ""
    lines = piped.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "architecture", "input", "weights"]
    for config, line in zip(TEACHERS.values(), lines[1:], strict=True):
        assert line.split()[:4] == [config.name, config.architecture, str(config.input_size), config.weights]
        assert line.endswith(config.description)
    code, out, _ = run_main(monkeypatch, capsys, "teachers", "--json")
    listed = json.loads(out)
    assert [t["name"] for t in listed] == list(TEACHERS) and listed[0]["input_size"] == 475


def test_stats_on_a_missing_path_says_so(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "stats", tmp_path / "nope")
    assert code == 1 and err == f"error: {tmp_path / 'nope'}: no such store (the path does not exist)\n"
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(monkeypatch, capsys, "stats", tmp_path / "empty")
    assert code == 1 and "not a label store (no manifest.json)" in err


def test_paths_are_printed_verbatim(image_folder, bundled_graphs, tmp_path, monkeypatch, capsys):
    """Rich markup and emoji codes in a path neither crash nor change what is printed."""
    name = "run[v2] m[/x] [bold]b :cat:"
    out = tmp_path / name
    engines = bundled_graphs.fp32.parent
    args = ["generate", image_folder, "--out", out, "--backend", "onnxruntime", "--engines-dir", engines]
    code, _, err = run_main(monkeypatch, capsys, *args, "--workers", "0", "--batch-size", "12")
    assert code == 0, err
    assert re.search(rf"labelling 12 of 12 images with onnxruntime .* into {re.escape(str(out))}\n", err), err
    assert f"store {out} complete" in err
    exported = tmp_path / f"maps{name}"
    code, _, err = run_main(monkeypatch, capsys, "export-relabel", out, "--out", exported, "-j", "1")
    assert code == 0 and err.endswith(f"\n{exported}: 12 label maps written\n"), err


def test_the_tensorrt_hint_keeps_its_brackets(bundled_graphs, monkeypatch, capsys):
    from trt_relabel.backends import tensorrt_missing

    if tensorrt_missing() is None:
        pytest.skip("TensorRT and a CUDA GPU are here: build-engine builds the engine instead of the hint")
    code, _, err = run_main(monkeypatch, capsys, "build-engine", "--engines-dir", bundled_graphs.fp32.parent)
    assert code == 0, err
    assert "the tensorrt package (pip install 'trt-relabel[gpu]') is missing here" in err


def test_former_and_timm_option_names(tmp_path, monkeypatch, capsys):
    """timm's --img-size sets train's --image-size; build-engine's former --out names the engines
    folder and may not be given with --engines-dir."""
    args = ["train", "--data", tmp_path, "--out", tmp_path / "run", "--label-mode", "original"]
    code, _, err = run_main(monkeypatch, capsys, *args, "--img-size", "4")
    assert code == 2 and "image_size must be >= 8" in err
    code, _, err = run_main(monkeypatch, capsys, "build-engine", "--out", tmp_path / "a", "--engines-dir", tmp_path)
    assert code == 2 and "give the engines folder once" in err
