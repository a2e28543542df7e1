"""Every command that reads a file someone else hands over (a model, an image, a study, a run
folder) is given crafted ones: empty, truncated, random bytes, text, a folder, a FIFO (which
would block a read). Each must end with exit 2 and one error line, no traceback, and nothing
written anywhere; the way tests/test_bad_input.py walks every setting."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from cifarlab.cli import main
from cifarlab.deploy import export

KINDS = ("empty", "truncated", "random", "text", "folder", "fifo")
OPENVINO = importlib.util.find_spec("openvino") is not None
# Deployed formats: .onnx (onnxruntime or OpenVINO) and OpenVINO's IR (an .xml beside its
# weights, .bin: a crafted .xml gets a .bin beside it, so that the .xml is what is judged).
SUFFIXES = [".pt", ".onnx", *([".xml"] if OPENVINO else [])]
# The commands that take a deployed file other than .onnx.
DEPLOYED_READERS = {"evaluate", "predict", "bench", "compare --variants"}


@pytest.fixture(scope="module")
def originals(trained_run, tmp_path_factory):
    """A real checkpoint and .onnx file, whose halves are the truncated kinds."""
    folder = tmp_path_factory.mktemp("originals")
    export.export(trained_run, folder / "model.onnx", exporter="torchscript")
    found = {".pt": (trained_run / "best.pt").read_bytes(),
             ".onnx": (folder / "model.onnx").read_bytes(),
             ".png": png(32, 32), ".yaml": b"preset: seed\nseeds: 1\nsampler: grid\n"}
    if OPENVINO:
        export.export(trained_run, folder / "model.xml", fmt="openvino")
        found[".xml"] = (folder / "model.xml").read_bytes()
    return found


def png(width: int, height: int) -> bytes:
    """A PNG of that size, written by hand so that a huge one costs no memory to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"".join(b"\0" + b"\0" * 3 * width for _ in range(min(height, 32))))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(
        b"IEND", b"")


def crafted(folder: Path, kind: str, suffix: str, originals: dict[str, bytes]) -> Path:
    path = folder / f"given{suffix}"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        real = originals[suffix]
        path.write_bytes(real[: len(real) // 2])
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4000))
    elif kind == "text":
        path.write_text("not what it says it is\n")
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":  # a header that claims 100 million pixels (the data are a few rows)
        path.write_bytes(png(100_000, 1000))
    return path


def state(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under `root`: folder or not, size and modification time; a run folder's
    empty lock file (.run.lock, taken and let go) aside."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".run.lock":
            continue
        info = p.lstat()
        found[str(p.relative_to(root))] = (p.is_dir(), info.st_size, info.st_mtime_ns)
    return found


def refused(args: list[str], root: Path, capsys) -> str:
    """Run the command; assert exit 2, one error line (beside at most the note of the
    file a run folder stands for), no traceback, nothing written under `root` or the
    current folder. Returns the error line."""
    before, here = state(root), state(Path.cwd())
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("cifarlab: error:")]
    assert code == 2, captured.err
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    assert all(line in errors or line.startswith("using ") for line in lines), captured.err
    assert captured.out == ""
    assert state(root) == before and state(Path.cwd()) == here
    return errors[0]


# The commands that read a model file, with {model} for it and {out} for a fresh folder.
MODEL_COMMANDS = {
    "evaluate": ["evaluate", "{model}", "--data", "synthetic:100"],
    "predict": ["predict", "{model}", "{image}"],
    "summary": ["summary", "{model}", "--json"],
    "export": ["export", "{model}", "-o", "{out}/model.onnx"],
    "quantize": ["quantize", "{model}", "--data", "synthetic:300", "-o", "{out}/q.onnx"],
    "bench": ["bench", "{model}", "--threads", "1"],
    "compare --variants": ["compare", "--variants", "{model}", "{run}", "--threads", "1",
                           "-o", "{out}/v.png"],
    "prune": ["prune", "{model}", "--ratio", "0.5", "--epochs", "1", "--out", "{out}"],
    "train --init-from": ["train", "--data", "synthetic:300", "--epochs", "1", "--init-from",
                          "{model}", "--out", "{out}"],
    "train --teacher": ["train", "--data", "synthetic:300", "--epochs", "1", "--teacher",
                        "{model}", "--out", "{out}"],
}
# Commands that take a checkpoint only (an .onnx file has no weights to train from).
CHECKPOINT_ONLY = {"prune", "train --init-from", "train --teacher"}


def fill(template: list[str], **paths: Path) -> list[str]:
    out = []
    for arg in template:
        for key, path in paths.items():
            arg = arg.replace("{" + key + "}", str(path))
        out.append(arg)
    return out


def reads(command: str, suffix: str) -> bool:
    """Whether `command` takes files of this kind at all."""
    if suffix == ".onnx":
        return command not in CHECKPOINT_ONLY
    return suffix == ".pt" or command in DEPLOYED_READERS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command, suffix", [(c, s) for c in MODEL_COMMANDS for s in SUFFIXES
                                             if reads(c, s)])
def test_every_model_reader_refuses_crafted_files(command, kind, suffix, originals,
                                                  trained_run, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    given, out = tmp_path / "given", tmp_path / "out"
    given.mkdir()
    out.mkdir()
    image = given / "image.png"
    image.write_bytes(originals[".png"])
    model = crafted(given, kind, suffix, originals)
    if suffix == ".xml" and kind != "folder":  # a .bin beside it: the .xml is what is read
        model.with_suffix(".bin").write_bytes(random.Random(2).randbytes(64))
    # compare --variants reads the real run too: a copy, which must come out untouched.
    run = tmp_path / "run"
    if "{run}" in MODEL_COMMANDS[command]:
        shutil.copytree(trained_run, run)
    error = refused(fill(MODEL_COMMANDS[command], model=model, out=out, image=image, run=run),
                    tmp_path, capsys)
    assert str(model) in error or model.name in error, error


@pytest.mark.parametrize("kind", [*KINDS, "huge"])
def test_predict_refuses_crafted_images(kind, originals, trained_run, tmp_path, capsys,
                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = crafted(tmp_path, kind, ".png", originals)
    error = refused(["predict", str(trained_run), str(image)], tmp_path, capsys)
    assert image.name in error, error


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["sweep", "train --config"])
def test_study_and_settings_files_are_refused(command, kind, originals, tmp_path, capsys,
                                              monkeypatch):
    pytest.importorskip("optuna")
    monkeypatch.chdir(tmp_path)
    given = tmp_path / "given"
    given.mkdir()
    path = crafted(given, kind, ".yaml", originals)
    args = (["sweep", str(path), "--out", str(tmp_path / "study")] if command == "sweep"
            else ["train", "--config", str(path), "--out", str(tmp_path / "runs")])
    error = refused(args, tmp_path, capsys)
    assert path.name in error, error


# A run folder's own files, spoiled one at a time, for the commands that need each.
RUN_FILES = {
    "best.pt": [["evaluate", "{run}", "--data", "synthetic:100"], ["summary", "{run}", "--json"],
                ["export", "{run}", "-o", "{out}/m.onnx"]],
    "last.pt": [["train", "--resume", "{run}", "--epochs", "3", "--allow-changes"]],
    "config.yaml": [["train", "--resume", "{run}", "--epochs", "3"]],
    "metrics.csv": [["report", "{run}"], ["plot", "{run}", "-o", "{out}/p.png"]],
}


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "fifo"])
@pytest.mark.parametrize("name, index", [(n, i) for n, c in RUN_FILES.items()
                                          for i in range(len(c))])
def test_spoiled_run_folder_files_are_refused(name, index, kind, trained_run, tmp_path,
                                              capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(trained_run, run)
    out.mkdir()
    target = run / name
    if kind == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif kind == "fifo":
        target.unlink()
        os.mkfifo(target)
    else:
        target.write_bytes(b"" if kind == "empty" else random.Random(1).randbytes(3000))
    error = refused(fill(RUN_FILES[name][index], run=run, out=out), tmp_path, capsys)
    assert name in error, error


@pytest.mark.parametrize("cut", ["lines removed", "a value"])
def test_a_config_yaml_cut_short_or_edited_is_named_on_resume(cut, trained_run, tmp_path,
                                                               capsys):
    """A config.yaml that still parses and passes every rule, but is not the run's: its
    missing settings would take their defaults. last.pt's copy of the settings tells."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    target = run / "config.yaml"
    lines = target.read_text().splitlines(keepends=True)
    if cut == "lines removed":
        kept = [line for line in lines if not line.startswith(("epochs:", "batch_size:"))]
        assert len(kept) < len(lines)
        target.write_text("".join(kept))
    else:
        target.write_text(target.read_text().replace("label_smoothing: 0.1",
                                                     "label_smoothing: 0.3"))
    error = refused(["train", "--resume", str(run), "--epochs", "3"], tmp_path, capsys)
    assert str(target) in error and "differ from those" in error and "--allow-changes" in error


@pytest.mark.parametrize("layers, message", [
    ({"stem.0": [60000, 60000, 1]}, "over 16,777,216 input-output channel pairs"),
    ({"stem.0": [10**7, 3, 1]}, "not 1 to 4 whole numbers from 1 to 65,536"),
    ({"stem.0": ["8", 3, 1]}, "not 1 to 4 whole numbers"),
    ({"nope.x": [4, 3, 1]}, "no layer 'nope.x' in the model"),
    ("abc", "not a mapping of layer names to shapes"),
])
@pytest.mark.parametrize("command", [["summary", "{model}", "--json"],
                                     ["export", "{model}", "-o", "{out}/m.onnx"],
                                     ["evaluate", "{model}", "--data", "synthetic:100"]],
                         ids=["summary", "export", "evaluate"])
def test_lying_layer_shapes_are_refused_before_allocation(layers, message, command,
                                                          trained_run, tmp_path, capsys,
                                                          monkeypatch):
    """A checkpoint that loads safely but declares its (pruned) layers falsely."""
    import torch

    monkeypatch.chdir(tmp_path)
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    ckpt["model_args"] = {**ckpt["model_args"], "layers": layers}
    model, out = tmp_path / "lying.pt", tmp_path / "out"
    torch.save(ckpt, model)
    out.mkdir()
    error = refused(fill(command, model=model, out=out), tmp_path, capsys)
    assert message in error and "damaged or not from cifarlab" in error, error
