"""cifarlab prune: torch-pruning on every registered model, the pruned architecture stored as
data and rebuilt exactly, the MAC target reached from below, and a pruned run folder that
evaluate, summary, export, report and --resume read like any other."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image
from test_step import WEIGHT_GRADIENT_ERRORS, run_on_avx2_kernels
from torch import nn

from cifarlab import checkpoint
from cifarlab.cli import main
from cifarlab.compress import prune
from cifarlab.models import LAYERS, MODELS, architecture, create_model, model_args
from cifarlab.profile import model_size

pytest.importorskip("torch_pruning")  # prune runs on torch-pruning; without it they skip


def outputs(model: nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(
            seed)))


@pytest.mark.parametrize("name", prune.supported())
def test_every_model_prunes_and_rebuilds_from_its_stored_architecture(name):
    torch.manual_seed(0)
    args = model_args(name, 10, 24 if name == "airbench" else 8)  # airbench's narrowest
    model = create_model(**args).eval()
    pruned = prune.prune_model(model, args, "ratio", 0.5, steps=2, round_to=2)
    assert pruned.macs < model_size(args).macs and pruned.params < model_size(args).params
    assert pruned.model_args[LAYERS]  # plain types: what a checkpoint (and ONNX metadata) holds
    assert json.loads(json.dumps(pruned.model_args)) == pruned.model_args
    rebuilt = create_model(**pruned.model_args)
    rebuilt.load_state_dict(pruned.model.state_dict())
    assert torch.equal(outputs(rebuilt), outputs(pruned.model))
    assert classifier_outputs(rebuilt) == 10
    # Every convolution that torch-pruning touched keeps a multiple of round_to channels.
    assert all(shape[1] % 2 == 0 for shape in pruned.model_args[LAYERS].values()
               if len(shape) == 3 and shape[2] == 1)


def test_zero_padding_resnets_and_unknown_models_are_refused():
    assert set(prune.supported()) | set(prune.UNSUPPORTED) == set(MODELS)
    for name in (*prune.UNSUPPORTED, "lenet"):
        with pytest.raises(prune.UserError, match="prune supports resnet18, resnet34"):
            prune.check_architecture({"name": name}, "x.pt")


def classifier_outputs(model: nn.Module) -> int:
    return prune.classifier(model).out_features


def test_the_target_is_met_from_below_by_the_largest_model():
    args = model_args("resnet18", 10, 16)
    model = create_model(**args)
    before = model_size(args).macs
    pruned = prune.prune_model(model, args, "macs", 0.5, round_to=2)
    assert 0.4 * before < pruned.macs <= 0.5 * before
    # Keeping a little more of each layer (one bisection interval) misses the target.
    wider = prune.prune_copy(model, args, pruned.ratio - 1 / 2 ** prune.SEARCH_ROUNDS,
                             "magnitude", 1, 2)
    assert wider.macs > 0.5 * before
    by_params = prune.prune_model(model, args, "params", 0.3, round_to=2)
    assert by_params.params <= 0.3 * model_size(args).params


def test_bn_scale_keeps_the_channels_with_the_largest_batchnorm_scales():
    args = model_args("vgg11_bn", 10, 8)
    model = create_model(**args).eval()
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    gammas = torch.randperm(first_bn.num_features).float() + 1
    with torch.no_grad():
        first_bn.weight.copy_(gammas)
    pruned = prune.prune_model(model, args, "ratio", 0.5, "bn-scale", round_to=1)
    kept = next(m for m in pruned.model.modules() if isinstance(m, nn.BatchNorm2d)).weight
    assert sorted(kept.tolist()) == sorted(gammas.topk(len(kept)).values.tolist())


def test_taylor_ranks_with_training_gradients_in_several_steps():
    args = model_args("resnet18", 10, 8)
    model = create_model(**args)
    batches = [(torch.randn(8, 3, 32, 32), torch.arange(8))]
    pruned = prune.prune_model(model, args, "ratio", 0.5, "taylor", steps=2, round_to=1,
                               batches=batches)
    magnitude = prune.prune_model(model, args, "ratio", 0.5, "magnitude", round_to=1)
    assert pruned.model_args == magnitude.model_args  # the same shapes, other channels
    assert any(not torch.equal(a, b) for a, b in zip(
        pruned.model.state_dict().values(), magnitude.model.state_dict().values(), strict=True))
    assert all(p.grad is None for p in pruned.model.parameters())
    assert all(p.grad is None for p in model.parameters())  # the parent is left alone


@pytest.fixture(scope="module")
def pruned_run(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned")
    assert main(["prune", str(trained_run), "--target-macs", "0.6", "--round-to", "2",
                 "--epochs", "1", "--out", str(out), "--name", "p"]) == 0
    return out / "p"


def test_a_pruned_run_is_an_ordinary_run_folder(pruned_run, capsys):
    info = json.loads((pruned_run / "prune.json").read_text())
    before, after = info["before"], info["after"]
    assert after["macs"] <= 0.6 * before["macs"] and after["params"] < before["params"]
    assert info["achieved"]["macs"] == after["macs"] / before["macs"]
    for side in (before, after):
        assert side["latency_ms"] > 0 and side["throughput"] > 0
    assert 0 <= after["val_acc_before_finetune"] <= 100 and info["finetuned"]["epochs"] == 1
    assert info["channels"] and all(b > a for b, a in info["channels"].values())
    best = checkpoint.load(pruned_run / "best.pt")  # weights_only=True
    assert best["model_args"] == info["model_args"]
    model = checkpoint.build_model(best)
    saved = torch.load(pruned_run / "best.pt", weights_only=True)
    again = create_model(**saved["model_args"])
    again.load_state_dict(saved["model"])
    assert torch.equal(outputs(model), outputs(again))
    # summary profiles the pruned model; evaluate reproduces the run's own test accuracy.
    assert main(["summary", str(pruned_run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["macs"] == after["macs"] and summary["params"] == after["params"]
    assert main(["evaluate", str(pruned_run), "--data", "synthetic:300", "--json"]) == 0
    result = json.loads((pruned_run / "result.json").read_text())
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(result["test_acc"])
    report = (pruned_run / "report.md").read_text()
    assert "## Pruning" in report and f"{after['params']:,}" in report
    # What was removed, in channels, and how noisy the latencies were.
    kept = list(info["channels"].values())
    removed, total = sum(b - a for b, a in kept), sum(b for b, _ in kept)
    assert f"{removed:,} of the {total:,} channels of the pruned layers removed" in report
    assert len(before["load_average"]) == 3 and "CPU latency, batch 1 (p90)" in report
    assert info["latency_noisy"] == (prune.noisy(before) or prune.noisy(after))
    # Its repeat is prune's command: train --config would train the unpruned architecture.
    assert (f"`cifarlab prune {info['parent']} --target-macs 0.6 --importance magnitude "
            f"--steps 1 --round-to 2 --config {pruned_run / 'config.yaml'}") in report
    assert "cifarlab train --config" not in report
    # bench counts the pruned model's MACs; predict reads its checkpoint.
    assert main(["bench", str(pruned_run), "--threads", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["macs"] == after["macs"] and row["architecture"] == info["model_args"]
    image = pruned_run.parent / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    assert main(["predict", str(pruned_run), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"]


def test_a_pruned_checkpoint_exports_to_onnx_with_parity(pruned_run, tmp_path):
    import onnxruntime as ort

    from cifarlab.deploy import export

    target = tmp_path / "pruned.onnx"
    assert main(["export", str(pruned_run), "-o", str(target)]) == 0
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = export.load(pruned_run / "best.pt").module(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - expected).max() < 1e-4


def test_a_pruned_fine_tune_resumes_with_its_architecture(pruned_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pruned_run, run)
    layers = json.loads((run / "prune.json").read_text())["model_args"][LAYERS]
    assert main(["train", "--resume", str(run), "--epochs", "2", "--allow-changes"]) == 0
    last = checkpoint.load(run / "last.pt")
    assert last["model_args"][LAYERS] == layers and last["epoch"] == 2
    assert len((run / "metrics.csv").read_text().splitlines()) == 3  # header and 2 epochs
    assert "## Pruning" in (run / "report.md").read_text()


# A pruned ResNet-18 whose strided 1x1 shortcut reads fewer than 16 channels, stepped by
# TrainStep from channels-last input on oneDNN's AVX2 kernels: each convolution's weight
# gradient against float64 ATen from the same input and output gradient (as test_step.py).
PRUNED_GRADIENTS = WEIGHT_GRADIENT_ERRORS + """
import json
from cifarlab.compress import prune
from cifarlab.models import create_model, model_args
from cifarlab.devices import memory_format
torch.manual_seed(0)
args = model_args("resnet18", 10, 16)
model = prune.prune_model(create_model(**args), args, "ratio", 0.5, round_to=2).model.train()
shortcut = model.layer2[0].shortcut[0]
model = model.to(memory_format=memory_format("cpu", model))
errors, _ = weight_gradient_errors(model, torch.randn(16, 3, 32, 32), torch.arange(16) % 10)
print(json.dumps({"errors": errors, "shortcut_in": shortcut.in_channels,
                  "stride": shortcut.stride[0]}))
"""

def test_a_pruned_model_gets_correct_gradients_on_avx2_kernels():
    proc = run_on_avx2_kernels([sys.executable, "-c", PRUNED_GRADIENTS], 120, "a pruned step")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["shortcut_in"] < 16 and result["stride"] == 2
    worst = max(result["errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-4, worst


def test_an_unpruned_model_keeps_its_plain_arguments_and_bad_layers_are_refused():
    args = model_args("resnet18", 10, 8)
    assert architecture(create_model(**args), args) == args  # no LAYERS entry
    ckpt = {"model_args": {**args, LAYERS: {"stem.1": [4, 4, 1]}}, "classes": list("abcdefghij"),
            "model": {}}
    with pytest.raises(prune.UserError, match="cannot build resnet18.*stem.1"):
        checkpoint.build_model(ckpt, "x.pt")
    ckpt["model_args"][LAYERS] = {"layer9.conv": [4, 4, 1]}
    with pytest.raises(prune.UserError, match="no layer 'layer9.conv'"):
        checkpoint.build_model(ckpt, "x.pt")


def test_taylor_batches_are_normalised_training_images_with_their_labels():
    import numpy as np

    images = np.zeros((100, 32, 32, 3), np.uint8)
    images[:, :, :, 0] = np.arange(100, dtype=np.uint8)[:, None, None]  # red = the label
    labels = np.arange(100, dtype=np.int64)
    batches = prune.taylor_batches(images, labels, (0.0, 0.5, 0.5), (1.0, 0.25, 0.25), seed=3)
    assert [len(y) for _, y in batches] == [64, 36]  # every image once, in batches of 64
    x, y = batches[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0, 0] * 255, y.float(), atol=1e-3)
    assert torch.all(x[:, 1] == -2.0)  # (0 - 0.5) / 0.25
    again = prune.taylor_batches(images, labels, (0.0, 0.5, 0.5), (1.0, 0.25, 0.25), seed=3)
    assert torch.equal(again[0][1], y) and not torch.equal(y, torch.arange(64))


def test_a_pruned_checkpoint_quantizes(pruned_run, tmp_path):
    import onnxruntime as ort

    target = tmp_path / "pruned.int8.onnx"
    assert main(["quantize", str(pruned_run), "--data", "synthetic:300", "--images", "64",
                 "--int8-format", "qdq-u8s8", "--max-drop", "100", "-o", str(target)]) == 0
    meta = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]
                                ).get_modelmeta().custom_metadata_map
    best = checkpoint.load(pruned_run / "best.pt")
    assert json.loads(meta["architecture"]) == best["model_args"]


def test_a_pruned_model_fine_tunes_with_its_parent_as_teacher_and_teaches_in_turn(
        trained_run, pruned_run, tmp_path):
    assert main(["prune", str(trained_run), "--target-macs", "0.6", "--round-to", "2",
                 "--epochs", "1", "--teacher", str(trained_run), "--out", str(tmp_path),
                 "--name", "kd"]) == 0
    result = json.loads((tmp_path / "kd" / "result.json").read_text())
    parent = checkpoint.load(trained_run / "best.pt")
    assert result["teacher"]["run_id"] == parent["run_id"]
    assert result["teacher"]["model_args"] == parent["model_args"]
    assert LAYERS in checkpoint.load(tmp_path / "kd" / "best.pt")["model_args"]
    # A pruned checkpoint is a teacher like any other: its architecture is in its model_args.
    assert main(["train", "--data", "synthetic:300", "--epochs", "1", "--workers", "0",
                 "--batch-size", "64", "--model", "mobilenetv2", "--set", "model.width=4",
                 "--teacher", str(pruned_run), "--out", str(tmp_path), "--name", "student"]) == 0
    student = json.loads((tmp_path / "student" / "result.json").read_text())
    assert student["teacher"]["model_args"] == checkpoint.load(pruned_run / "best.pt")[
        "model_args"]


def recorded(trained_run, tmp_path, **changes):
    """The trained run's best.pt with its recorded config changed (dotted keys): a
    checkpoint handed over by someone else."""
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        section = ckpt["config"]
        for part in parents:
            section = section[part]
        section[leaf] = value
    path = tmp_path / "handed-over.pt"
    checkpoint.save_atomic(ckpt, path)
    return path


def test_prune_takes_no_path_from_the_checkpoint(trained_run, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = recorded(trained_run, tmp_path, out=str(elsewhere / "runs"),
                    data__root=str(elsewhere / "data"), data__test_source=str(elsewhere / "t"),
                    distill__teacher=str(trained_run))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["prune", str(path), "--ratio", "0.5", "--round-to", "2", "--epochs", "1",
                 "--name", "p"]) == 0
    assert list(elsewhere.iterdir()) == []  # no run folder, no data cache there
    result = json.loads((work / "runs" / "p" / "result.json").read_text())
    assert result.get("teacher") is None  # the recorded teacher was not opened
    config = (work / "runs" / "p" / "config.yaml").read_text()
    assert str(elsewhere) not in config and "teacher: ''" in config
    assert "source: synthetic:300" in config  # a source named by a keyword is kept


def test_prune_asks_for_the_data_of_a_checkpoint_trained_on_a_path(trained_run, tmp_path,
                                                                    monkeypatch, capsys):
    path = recorded(trained_run, tmp_path, data__source="/etc")
    monkeypatch.chdir(tmp_path)
    assert main(["prune", str(path), "--ratio", "0.5", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give the data with --data PATH" in err
    assert not (tmp_path / "runs").exists()
    # The user's own --data is used; the recorded one is not read.
    assert main(["prune", str(path), "--ratio", "0.5", "--epochs", "1",
                 "--data", str(tmp_path / "missing")]) == 2
    assert "--data " + str(tmp_path / "missing") in capsys.readouterr().err


def test_a_latency_whose_p90_is_far_above_its_median_is_noisy():
    assert prune.noisy({"latency_ms": 10.0, "latency_p90_ms": 84.0})  # a busy machine
    assert not prune.noisy({"latency_ms": 10.0, "latency_p90_ms": 12.0})
