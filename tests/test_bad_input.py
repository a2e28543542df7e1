"""Bad input of every kind, for every setting and every command's flags: exit code 2, one
line on stderr, no traceback, nothing written; and the valid values next to them accepted.

Every call runs `cifarlab.cli.main` in this process on a tiny run (`synthetic:40`, one epoch,
width 4), so that a bad value wrongly accepted would train for a moment, not for long.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import tarfile
import time
import typing
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cifarlab import checkpoint, memory, settings_rules
from cifarlab import config as cfg
from cifarlab.cli import main

TINY = ["train", "--data", "synthetic:40", "--epochs", "1", "--workers", "0",
        "--set", "model.width=4"]

# For each setting: values (as typed after --set, read as YAML) that must be refused beyond
# the wrong types and non-finite numbers tried for every key of a type, and valid edge values
# that must be accepted. A new setting fails test_every_setting_has_cases until it is here.
CASES: dict[str, tuple[list[str], list[str]]] = {
    "preset": (["foo", "seed", "3"], []),  # chosen with --preset only; see test_preset_*
    "data.source": (['""', '"  "'], ["synthetic:40", "./my-images"]),
    "data.test_source": (['""'], ["none", "auto"]),
    "data.root": (['""'], ["data"]),
    "data.val_fraction": (["0", "1", "-0.1", "1.5", "1e300"], ["0.01", "0.99"]),
    "data.split_seed": (["-1", "4294967296", "99999999999999999999"], ["0", "4294967295"]),
    "data.limit": (["19", "0", "-5", "1000000000001"], ["20", "null"]),
    "data.resize": ([], ["true", "false"]),
    "data.loader": (["gpu", '""'], ["auto", "torchvision", "resident"]),
    "data.workers": (["-2", "257", "1000000"], ["-1", "0", "256"]),
    "data.label_set": (["medium", '""', "Fine"], ["fine"]),
    "data.augment.hflip": (["2", "-0.1", "1.0001"], ["0", "1"]),
    "data.augment.rotate_degrees": (["-1", "181", "1e9"], ["0", "180"]),
    "data.augment.brightness": (["-0.1", "1.5", "1e30"], ["0", "1"]),
    "data.augment.contrast": (["-0.1", "1.5"], ["0", "1"]),
    "data.augment.saturation": (["-0.1", "1.5"], ["0", "1"]),
    "data.augment.hue": (["-0.1", "0.51"], ["0", "0.5"]),
    "data.augment.flip_mode": (["alternating", '""', "Random"], ["random"]),  # alternate: below
    "data.augment.crop_padding": (["-1", "33", "100000"], ["0", "32"]),
    "data.augment.crop_padding_mode": (["zeros", "edge", '""'], ["constant", "reflect"]),
    "data.augment.translate": (["-0.1", "1.5"], ["0", "1"]),
    "data.augment.erase_p": (["2", "-1"], ["0", "1"]),
    "data.augment.erase_scale": (["[0.5,0.1]", "[-0.1,0.2]", "[0.1,1.5]", "[]"],
                                 ["[0,1]", "[0.2,0.2]"]),
    "data.augment.erase_ratio": (["[3.3,0.3]", "[0,1]", "[-1,1]", "[]"],
                                 ["[1,1]", "[0.01,100]"]),
    "data.augment.policy": (["autoaugment_imagenet", "trivial", '""'],
                            ["none", "trivialaugment", "randaugment", "autoaugment"]),
    "data.augment.randaugment_n": (["-1", "11"], ["0", "10"]),
    "data.augment.randaugment_m": (["-1", "31"], ["0", "30"]),
    "data.augment.cutout": (["-1", "33"], ["0", "32"]),
    "model.name": (["resnet", '""'], ["resnet18"]),
    "model.width": (["0", "-3", "1000001", "10000000000000"], ["1", "64"]),
    "optim.name": (["adam", "SGD", '""'], ["sgd", "adamw"]),
    "optim.lr": (["0", "-0.1"], ["1e-9", "1e30"]),
    "optim.momentum": (["-0.1", "1", "2"], ["0", "0.999"]),
    "optim.weight_decay": (["-1", "2"], ["0", "1"]),
    "optim.nesterov": ([], ["true", "false"]),
    "optim.label_smoothing": (["-0.1", "1"], ["0", "0.99"]),
    "optim.schedule": (["step", '""'], ["cosine", "onecycle", "multistep", "constant"]),
    "optim.warmup_epochs": (["-1", "1e7"], ["0", "0.5", "1000000"]),
    "optim.milestones": (["[]", "[0.5,0.3]", "[0.5,0.5]", "[0]", "[1]", "[-0.1]", "[0.5,2]"],
                         ["[0.5]", "[0.3,0.6,0.8]", "[0.001,0.999]"]),
    "optim.gamma": (["0", "-0.1", "1.5"], ["0.001", "1"]),
    "optim.bias_lr_scale": (["0", "-1", "10001"], ["0.001", "64", "10000"]),
    "optim.head_lr_scale": (["0", "-1", "10001"], ["0.001", "1", "10000"]),
    "optim.clip_grad_norm": (["-1", "1e7"], ["0", "0.5", "1e6"]),
    "optim.accumulate": (["0", "-1", "1025", "1.5"], ["1", "4", "128"]),
    "optim.whiten_bias_epochs": (["-1", "1e7"], ["0", "3", "1000000"]),
    "optim.lookahead_steps": (["-1", "2.5", "1000001"], ["0", "5", "1000000"]),
    "optim.lookahead_decay": (["-0.1", "1", "nan"], ["0", "0.774", "0.999"]),
    "mix.mixup_alpha": (["-0.1", "101", "1e9"], ["0", "0.2", "100"]),
    "mix.cutmix_alpha": (["-0.1", "101"], ["0", "1", "100"]),
    "mix.prob": (["-0.1", "1.5"], ["0", "1"]),
    "mix.switch_prob": (["-0.1", "1.5"], ["0", "1"]),
    "ema.enabled": ([], ["true", "false"]),
    "ema.decay": (["-0.1", "1", "2"], ["0", "0.9999"]),
    "ema.select": (["best", "EMA", '""'], ["model"]),  # ema: with ema.enabled, below
    "distill.teacher": (['" runs/teacher"', '"best.pt "'], ['""', "runs/teacher/best.pt"]),
    "distill.temperature": (["0", "-1", "101"], ["0.01", "1", "100"]),
    "distill.alpha": (["-0.1", "1.5"], ["0", "1"]),
    "epochs": (["0", "-1", "1000001"], ["1", "1000000"]),
    "batch_size": (["0", "-1", "1000001"], ["1", "1000000"]),
    "tta_flip": ([], ["true", "false"]),
    "tta_translate": ([], ["true", "false"]),
    "patience": (["-1", "1000001"], ["0", "1000000"]),
    "amp": (["fp8", '""'], ["auto", "fp16", "bf16", "off"]),
    "device": (["gpu", '""'], ["auto", "cpu"]),
    "threads": (["-1", "1025", "1e9"], ["0", "1", "1024"]),
    "compile": (["on", '""'], ["off"]),
    "seed": (["-1", "4294967296", "99999999999999999999"], ["0", "4294967295"]),
    "deterministic": ([], ["true", "false"]),
    "stop_grace": (["0", "-5", "1e9"], ["0.5", "600"]),
    "sync_batchnorm": ([], ["false"]),
    "tensorboard": ([], ["true", "false"]),
    "out": (['""'], ["elsewhere"]),
    "name": (['""', ".", "..", "../escape", "a/b", "/abs", "a\\b", '" x"', "x" * 256],
             ["a", "run-1.v2", "..a", "x" * 255]),
}

WRONG_TYPE = {
    int: ["ten", "1.5", "true", "[1]", "{a: 1}"],
    float: ["x", "true", "[1]", "{a: 1}"],
    bool: ["3", "x", "[true]", "yes", "off"],
    str: ["[a]", "{a: 1}", "3"],
    tuple: ["0.1", "[0.1]", "[x,0.2]", "[0.1,0.2,0.3]", "[true,0.2]"],
    list: ["0.1", "[x]", "[true]", "[[0.5]]", "{a: 1}"],
}
NOT_FINITE = [".nan", ".inf", "-.inf", "nan", "1e999"]


def kind_of(key: str) -> type:
    """The type a setting holds: int, float, bool, str, tuple (of a fixed length) or list
    (a tuple of any length); Optional unwrapped."""
    cls: type = cfg.Config
    *parents, leaf = key.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    hint = typing.get_type_hints(cls)[leaf]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return list if typing.get_args(hint)[1:] == (Ellipsis,) else tuple
    return args[0] if args and typing.get_origin(hint) is not None else hint


def invalid_values() -> list[tuple[str, str]]:
    cases = []
    for key in cfg.settings():
        kind = kind_of(key)
        values = list(CASES.get(key, ([], []))[0]) + WRONG_TYPE[kind]
        if kind is float:
            values += NOT_FINITE
        if kind is tuple:
            values += ["[.nan,0.2]", "[0.1,.inf]", "[-.inf,1]"]
        if kind is list:
            values += ["[.nan]", "[0.1,.inf]"]
        cases += [(key, v) for v in values]
    return cases


@pytest.fixture
def place(tmp_path, monkeypatch):
    """The working folder, inside tmp_path: `refused` checks that nothing appears in either."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path


def refused(args: list[str], place: Path, capsys) -> str:
    """Run the command; assert exit 2, one line, no traceback, nothing written. The error."""
    before = sorted(place.rglob("*"))
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    assert err.startswith("cifarlab: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert sorted(place.rglob("*")) == before, args
    return err


def test_every_setting_has_cases():
    assert set(CASES) == set(cfg.settings())
    assert set(settings_rules.RULES) == set(cfg.settings())


@pytest.mark.parametrize("key, value", invalid_values())
def test_bad_setting_is_refused_before_anything_is_written(key, value, place, capsys):
    err = refused([*TINY, "--out", str(place / "runs"), "--set", f"{key}={value}"], place,
                  capsys)
    assert key in err


@pytest.mark.parametrize("key, value", [(k, v) for k, (_, ok) in CASES.items() for v in ok])
def test_valid_edge_setting_is_accepted(key, value, capsys):
    assert main([*TINY, "--set", f"{key}={value}", "--print-config"]) == 0, capsys.readouterr()
    printed = yaml.safe_load(capsys.readouterr().out)
    for part in key.split("."):
        printed = printed[part]
    expected = cfg.parse_override(f"{key}={value}")  # the value as --set reads it
    for part in key.split("."):
        expected = expected[part]
    if isinstance(printed, float):  # YAML 1.1 reads 1e-9 (no dot) as text; so does --set
        expected = float(expected)
    assert printed == (list(expected) if isinstance(expected, list) else expected)


def test_bad_setting_messages_name_the_fix(place, capsys):
    out = ["--out", str(place / "runs")]
    err = refused([*TINY, *out, "--set", "data.augment.hflip=2"], place, capsys)
    assert "must be a probability in [0, 1], got 2; e.g. --set data.augment.hflip=1" in err
    err = refused([*TINY, *out, "--set", "data.augment.erase_scale=[0.5,0.1]"], place, capsys)
    assert "the lower first" in err and "e.g. --set data.augment.erase_scale=[0.1,0.5]" in err
    err = refused([*TINY, *out, "--set", "seed=-1"], place, capsys)
    assert "e.g. --set seed=0" in err
    err = refused([*TINY, *out, "--set", "seed=4294967296"], place, capsys)
    assert "e.g. --set seed=4294967295" in err
    err = refused([*TINY, *out, "--set", "name=../escape"], place, capsys)
    assert "one folder name" in err and "e.g. --set name=escape" in err
    err = refused([*TINY, *out, "--set", "optim.warmup_epochs=.inf"], place, capsys)
    assert "got inf" in err
    err = refused([*TINY, *out, "--set", "amp=bf61"], place, capsys)
    assert "e.g. --set amp=bf16" in err


@pytest.mark.parametrize("flags", [
    ["--seed", "-1"], ["--seed", "4294967296"], ["--epochs", "0"], ["--batch-size", "0"],
    ["--batch-size", "-3"], ["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"], ["--limit", "5"],
    ["--workers", "-2"], ["--name", "../escape"], ["--name", "a/b"], ["--name", ""],
    ["--name", ".."], ["--out", ""], ["--data", ""], ["--test-data", ""], ["--gpus", "0"],
    ["--device", "tpu"], ["--amp", "fp8"], ["--compile", "on"], ["--loader", "gpu"],
    ["--limit", "20", "--set", "data.val_fraction=0.01"],
    ["--set", "optim.nesterov=true", "--set", "optim.momentum=0"],
    ["--set", "sync_batchnorm=true", "--device", "cpu"],
    ["--set", "optim.name=adamw", "--set", "optim.nesterov=true"],
    ["--set", "ema.select=ema"],
])
def test_bad_train_flags_are_refused(flags, place, capsys):
    refused([*TINY, "--out", str(place / "runs"), *flags], place, capsys)


def test_ema_selection_with_ema_on_is_accepted(capsys):
    args = ["--set", "ema.enabled=true", "--set", "ema.select=ema", "--print-config"]
    assert main([*TINY, *args]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ema"] == {
        "enabled": True, "decay": 0.999, "select": "ema"}


def test_run_folder_stays_inside_out(place, capsys):
    for name in ("../escape", "a/b", "/tmp/abs"):
        refused([*TINY, "--out", str(place / "runs"), "--name", name], place, capsys)
    assert not (place / "escape").exists() and not (place / "runs").exists()


def test_coarse_labels_need_cifar100(place, capsys):
    err = refused([*TINY, "--out", str(place / "runs"), "--set", "data.label_set=coarse"],
                  place, capsys)
    assert "data.label_set=coarse needs CIFAR-100" in err and "synthetic:40" in err


def test_preset_is_chosen_with_the_flag_only(place, capsys):
    err = refused([*TINY, "--out", str(place / "runs"), "--set", "preset=fast"], place, capsys)
    assert "--preset fast" in err
    bad = place / "cwd" / "bad.yaml"
    bad.write_text("preset: foo\n")
    err = refused([*TINY, "--out", str(place / "runs"), "--config", str(bad)], place, capsys)
    assert "unknown preset 'foo'" in err
    bad.unlink()
    good = place / "c.yaml"
    good.write_text("preset: baseline\n")
    assert main([*TINY, "--config", str(good), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["preset"] == "baseline" and printed["optim"]["schedule"] == "constant"


def test_config_file_with_aliases_is_refused_before_they_grow(place, capsys):
    laughs = place / "laughs.yaml"
    rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)]  # 10**9 values once expanded
    laughs.write_text("\n".join(rows) + "\n")
    err = refused([*TINY, "--out", str(place / "runs"), "--config", str(laughs)], place, capsys)
    assert "line 2 repeats '&a' with the alias '*a'" in err and str(laughs) in err


def test_config_file_with_a_duplicated_key_is_refused(place, capsys):
    dup = place / "dup.yaml"
    dup.write_text("epochs: 1\noptim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.5\n")
    err = refused([*TINY, "--out", str(place / "runs"), "--config", str(dup)], place, capsys)
    assert "key 'lr' appears twice (lines 3 and 5)" in err and str(dup) in err
    dup.write_text("{epochs: 1, epochs: 2}\n")
    assert "key 'epochs' appears twice" in refused(
        [*TINY, "--out", str(place / "runs"), "--config", str(dup)], place, capsys)


def test_valid_edges_train(tmp_path, capsys):
    """The extreme valid augmentation and seeds really run, on both loaders."""
    edges = ["data.augment.hflip=1", "data.augment.rotate_degrees=180",
             "data.augment.brightness=1", "data.augment.contrast=1",
             "data.augment.saturation=1", "data.augment.hue=0.5",
             "data.augment.crop_padding=32", "data.augment.translate=1",
             "data.augment.erase_p=1", "data.augment.erase_scale=[0,1]",
             "data.augment.erase_ratio=[1,1]", "seed=4294967295",
             "data.split_seed=4294967295", "optim.label_smoothing=0.99",
             "optim.momentum=0.999", "optim.weight_decay=1", "batch_size=1000000",
             "data.augment.policy=randaugment", "data.augment.randaugment_n=10",
             "data.augment.randaugment_m=30", "data.augment.cutout=32"]
    sets = [a for e in edges for a in ("--set", e)]
    for loader in ("torchvision", "resident"):
        assert main([*TINY, *sets, "--loader", loader, "--out", str(tmp_path),
                     "--name", loader]) == 0, capsys.readouterr().err
        assert (tmp_path / loader / "best.pt").is_file()


# ------------------------------------------------------------------------ other commands


def test_other_commands_flags(trained_run, place, capsys):
    missing = str(place / "none.pt")  # range checks come before the checkpoint is read
    for args, message in [
        (["summary", "--width", "0"], "--width 0: must be from 1"),
        (["summary", "--width", "-3"], "--width -3"),
        (["summary", "--width", "1000001"], "--width 1000001"),
        (["summary", "--classes", "0"], "--classes 0: must be from 2 to 100000"),
        (["summary", "--classes", "1"], "--classes 1"),
        (["evaluate", str(trained_run), "--data", "synthetic:40", "--batch-size", "0"],
         "--batch-size 0"),
        (["evaluate", missing, "--data", "synthetic:40", "--batch-size", "-1"],
         "--batch-size -1"),
        (["predict", str(trained_run), "x.png", "--topk", "0"], "--topk 0"),
        (["predict", str(trained_run), "x.png", "--topk", "-2"], "--topk -2"),
        (["predict", str(trained_run), "x.png", "--topk", "1000001"], "--topk 1000001"),
        (["summary", "--classes", "100001"], "--classes 100001: must be from 2 to 100000"),
        (["evaluate", missing, "--data", "synthetic:40", "--batch-size", "1000001"],
         "--batch-size 1000001"),
        (["bench", missing, "--threads", "1025"], "--threads 1025: must be from 1 to 1024"),
        (["quantize", missing, "--data", "synthetic:40", "--threads", "1025"],
         "--threads 1025"),
        (["compare", "--variants", missing, missing, "--threads", "1025"], "--threads 1025"),
    ]:
        assert message in refused(args, place, capsys)
    # The valid edges next to them.
    assert main(["summary", "--width", "1", "--classes", "2", "--json"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(trained_run), "--data", "synthetic:40",
                 "--batch-size", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert f"using {trained_run / 'best.pt'}" in captured.err
    assert captured.out.startswith("{")  # the JSON alone on stdout
    image = place / "cwd" / "x.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    assert main(["predict", str(trained_run), str(image), "--topk", "1", "--json"]) == 0
    assert len(yaml.safe_load(capsys.readouterr().out)[0]["predictions"]) == 1


def test_run_folder_without_best_pt(place, capsys):
    folder = place / "cwd" / "run"
    folder.mkdir()
    for args in (["evaluate", str(folder), "--data", "synthetic:40"],
                 ["predict", str(folder), "x.png"]):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and "a folder without best.pt" in err and err.count("\n") == 1


def _zip_without_pickle() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("notes.txt", "hello")
    return buffer.getvalue()


def _image(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("name, data, reason", [
    ("png", lambda: _image("PNG"), "not a PyTorch checkpoint file (it starts like a PNG image)"),
    ("jpeg", lambda: _image("JPEG"), "it starts like a JPEG image"),
    ("text", lambda: b"hello, this is text\n" * 20, "not a checkpoint (text file)"),
    ("junk", lambda: bytes(range(1, 256)) * 8, "not a PyTorch checkpoint file (unrecognised"),
    ("truncated", lambda: None, "truncated or damaged zip archive"),
    ("zip", _zip_without_pickle, "no data.pkl inside"),
    ("empty", lambda: b"", "empty file"),
])
def test_checkpoint_errors_say_why_in_words(trained_run, place, capsys, name, data, reason):
    contents = data()
    if contents is None:
        good = (trained_run / "best.pt").read_bytes()
        contents = good[: len(good) // 2]
    path = place / "cwd" / f"{name}.pt"
    path.write_bytes(contents)
    for args in (["evaluate", str(path), "--data", "synthetic:40"],
                 ["predict", str(path), str(path)]):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and reason in err and str(path) in err, err
        assert err.count("\n") == 1 and "weights_only" not in err


def test_refused_pickle_never_suggests_weights_only_false(tmp_path):
    import os

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": RunsCode()}, path)
    with pytest.raises(cfg.UserError) as info:
        checkpoint.load(path)
    assert "it asks to import posix.system" in str(info.value) or "nt.system" in str(info.value)
    assert "weights_only" not in str(info.value)


# ------------------------------------------------------------------------ data, model, resume


def _class_folder(root: Path, classes: list[str]) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_one_class_is_refused(tmp_path, capsys):
    data = _class_folder(tmp_path / "imgs", ["cat"])
    code = main([*TINY, "--data", str(data), "--test-data", "none", "--out",
                 str(tmp_path / "runs"), "--data-root", str(tmp_path / "root")])
    err = capsys.readouterr().err
    assert code == 2 and "one class ('cat')" in err and str(data) in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("member", ["/abs/evil.png", "../evil.png", "cat/../../evil.png"])
def test_tar_member_outside_the_archive_is_named(tmp_path, capsys, member):
    archive = tmp_path / "imgs.tar.gz"
    png = _image("PNG")
    png32 = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png32, "PNG")
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in [("cat/0.png", png32.getvalue()), ("dog/0.png", png32.getvalue()),
                           (member, png)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    code = main([*TINY, "--data", str(archive), "--out", str(tmp_path / "runs"),
                 "--data-root", str(tmp_path / "root")])
    err = capsys.readouterr().err
    assert code == 2 and f"member '{member}'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_model_too_large_is_refused_before_allocation(place, capsys):
    free = memory.available(torch.device("cpu"))
    if free is None or free > 1e14:
        pytest.skip("free memory unknown here, or more than the model needs")
    start = time.perf_counter()
    err = refused([*TINY, "--out", str(place / "runs"), "--set", "model.width=100000"],
                  place, capsys)
    assert time.perf_counter() - start < 20
    assert "model.width=100000 needs about" in err and "TB" in err
    assert "lower model.width (e.g. --set model.width=" in err and "--batch-size" in err


def test_memory_estimate_grows_with_width_and_batch():
    small = memory.estimate("resnet18", 10, 8, 64)
    assert memory.estimate("resnet18", 10, 16, 64).state > 3 * small.state
    # Activations scale with the batch (the weights that autograd also keeps do not).
    ratio = memory.estimate("resnet18", 10, 8, 128).activations / small.activations
    assert 1.9 < ratio <= 2
    # Weights, gradients and momentum of ResNet-18's 11.2 M float32 parameters.
    seed = memory.estimate("resnet18", 10, 64, 256)
    assert 3 * 11_173_962 * 4 <= seed.state < 3 * 11_173_962 * 4 + 1e6


def _strip_run_id(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop("run_id", None)
    torch.save(ckpt, path)


def test_resume_refuses_another_runs_checkpoint(trained_run, tmp_path, capsys):
    run_id = checkpoint.read_run_id(trained_run)
    assert run_id and len(run_id) == 32
    assert torch.load(trained_run / "last.pt", weights_only=True)["run_id"] == run_id
    assert torch.load(trained_run / "best.pt", weights_only=True)["run_id"] == run_id
    folder = tmp_path / "copy"
    shutil.copytree(trained_run, folder)
    checkpoint.write_run_id(folder, checkpoint.new_run_id())  # as if last.pt came from elsewhere
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code = main(["train", "--resume", str(folder), "--epochs", "3", "--allow-changes"])
    err = capsys.readouterr().err
    assert code == 2 and f"{folder / 'last.pt'} belongs to another run (id {run_id}" in err
    assert err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # A last.pt without an id in a folder with one; an id in last.pt but none in the folder.
    _strip_run_id(folder / "last.pt")
    assert main(["train", "--resume", str(folder), "--epochs", "3", "--allow-changes"]) == 2
    assert "carries no run id" in capsys.readouterr().err
    shutil.copy(trained_run / "last.pt", folder / "last.pt")
    (folder / checkpoint.RUN_ID_FILE).unlink()
    assert main(["train", "--resume", str(folder), "--epochs", "3", "--allow-changes"]) == 2
    assert f"echo {run_id} >" in capsys.readouterr().err


def test_run_from_before_run_ids_resumes_and_gets_one(trained_run, tmp_path, capsys):
    folder = tmp_path / "old"
    shutil.copytree(trained_run, folder)
    (folder / checkpoint.RUN_ID_FILE).unlink()
    _strip_run_id(folder / "last.pt")
    assert main(["train", "--resume", str(folder), "--epochs", "3", "--allow-changes"]) == 0
    run_id = checkpoint.read_run_id(folder)
    assert run_id and run_id != checkpoint.read_run_id(trained_run)
    assert torch.load(folder / "last.pt", weights_only=True)["run_id"] == run_id


def test_repeating_a_run_from_its_config_gets_a_new_id(trained_run, tmp_path, capsys):
    saved = trained_run / "config.yaml"
    assert "run_id" not in saved.read_text()
    assert main(["train", "--config", str(saved), "--epochs", "1", "--out", str(tmp_path),
                 "--name", "again"]) == 0
    new_id = checkpoint.read_run_id(tmp_path / "again")
    assert new_id and new_id != checkpoint.read_run_id(trained_run)
    assert torch.load(tmp_path / "again" / "last.pt", weights_only=True)["run_id"] == new_id


def test_rules_do_not_change_the_presets():
    from cifarlab.presets import PRESETS

    for make in PRESETS.values():
        config = make()
        assert config.validate() is config
    assert dataclasses.asdict(cfg.Config()) == dataclasses.asdict(PRESETS["seed"]())


def test_resume_refuses_a_config_yaml_with_a_duplicated_key(trained_run, tmp_path, capsys):
    folder = tmp_path / "dup"
    shutil.copytree(trained_run, folder)
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text + "epochs: 7\n")
    code = main(["train", "--resume", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and f"{folder / 'config.yaml'}: key 'epochs' appears twice" in err


def test_prune_flags_and_checkpoints(trained_run, place, capsys):
    """Unreachable targets and checkpoints prune cannot read: one line, exit 2, no run folder
    (`refused` checks that nothing appears under --out)."""
    pytest.importorskip("torch_pruning")  # the targets are tried by pruning
    out = ["--out", str(place / "cwd" / "runs"), "--epochs", "1"]
    best = checkpoint.load(trained_run / "best.pt")
    foreign = place / "foreign.pt"
    checkpoint.save_atomic({**best, "model_args": {**best["model_args"], "name": "lenet"}},
                           foreign)
    padded = place / "padded.pt"
    checkpoint.save_atomic({**best, "model_args": {"name": "resnet20", "num_classes": 10}},
                           padded)
    text = place / "notes.pt"
    text.write_text("not a checkpoint\n")
    run = str(trained_run / "best.pt")
    for args, message in [
        (["prune", run, "--target-macs", "0"], "--target-macs 0: cannot be reached"),
        (["prune", run, "--target-macs", "1"], "--target-macs 1: cannot be reached"),
        (["prune", run, "--target-params", "1.5"], "--target-params 1.5: cannot be reached"),
        (["prune", run, "--ratio", "-0.2"], "--ratio -0.2: cannot be reached"),
        # Width 4 with channels in multiples of 8: no channel can go.
        (["prune", run, "--target-macs", "0.5"], "--target-macs 0.5: cannot be reached"),
        (["prune", run, "--target-macs", "0.001", "--round-to", "2"],
         "smallest pruned model keeps"),
        (["prune", run, "--target-macs", "0.5", "--steps", "0"], "--steps 0"),
        (["prune", run, "--target-macs", "0.5", "--steps", "101"], "--steps 101: must be "
         "from 1 to 100"),
        (["prune", run, "--target-macs", "0.5", "--round-to", "1025"], "--round-to 1025"),
        (["prune", run, "--target-macs", "0.5", "--round-to", "0"], "--round-to 0"),
        (["prune", str(foreign), "--target-macs", "0.5"], "architecture 'lenet': unknown"),
        (["prune", str(padded), "--target-macs", "0.5"], "zero-padding shortcuts"),
        (["prune", str(text), "--target-macs", "0.5"], "not a checkpoint (text file)"),
    ]:
        assert message in refused([*args, *out], place, capsys)
