"""Knowledge distillation (training/distill.py): the loss against a hand computation and its
limits, the frozen teacher in the step, and `cifarlab train --teacher` on tiny runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN
from test_step import SyncOps, step_parts
from torch import nn

from cifarlab import checkpoint
from cifarlab.cli import main
from cifarlab.config import DataConfig, apply_dict
from cifarlab.data.splits import prepare_splits
from cifarlab.models import create_model, model_args
from cifarlab.presets import get_preset
from cifarlab.step import TrainStep
from cifarlab.train import fit
from cifarlab.training.distill import DistillLoss, kd_loss, load_teacher
from cifarlab.training.mixing import SoftTargetCrossEntropy, soft_targets

STUDENT = [*TINY_TRAIN, "--epochs", "1"]  # the data of conftest's trained_run, one epoch


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_the_loss_matches_a_hand_computation():
    student = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    teacher = np.array([[1.5, 0.0, -0.5], [-1.0, 2.0, 1.0]])
    labels = np.array([0, 2])
    t, alpha = 3.0, 0.7
    p_teacher = np.exp(_log_softmax(teacher / t))
    kl = (p_teacher * (_log_softmax(teacher / t) - _log_softmax(student / t))).sum() / 2
    ce = -_log_softmax(student)[[0, 1], labels].mean()
    expected = alpha * t * t * kl + (1 - alpha) * ce

    loss = DistillLoss(nn.CrossEntropyLoss(), t, alpha)(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(labels))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(torch.tensor(student), torch.tensor(teacher), t).item() == pytest.approx(
        t * t * kl, rel=1e-6)


def test_alpha_0_is_the_runs_own_loss_and_alpha_1_the_teachers_alone():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert torch.equal(DistillLoss(smoothed, 4.0, 0.0)(student, teacher, labels),
                       smoothed(student, labels))
    # mixup's soft targets: the criterion takes them as they are
    targets = soft_targets(labels, 5, 0.1)
    mixed = 0.7 * targets + 0.3 * targets.flip(0)
    soft = SoftTargetCrossEntropy()
    assert torch.equal(DistillLoss(soft, 4.0, 0.0)(student, teacher, mixed), soft(student, mixed))
    both = DistillLoss(soft, 4.0, 0.5)(student, teacher, mixed)
    assert both.item() == pytest.approx(
        0.5 * kd_loss(student, teacher, 4.0).item() + 0.5 * soft(student, mixed).item())
    assert torch.equal(DistillLoss(soft, 4.0, 1.0)(student, teacher, mixed),
                       kd_loss(student, teacher, 4.0))
    assert kd_loss(teacher, teacher, 4.0).abs().item() < 1e-7  # nothing to learn from itself


def test_t_squared_keeps_the_gradients_scale_at_high_temperature():
    """Hinton et al.'s limit: with zero-mean logits and T large, the gradient of
    T^2 * KL on a student logit tends to (student - teacher) / (classes * batch), whatever
    T is; without the T^2 it would shrink as 1 / T^2."""
    torch.manual_seed(1)
    teacher = torch.randn(4, 10)
    teacher -= teacher.mean(1, keepdim=True)
    start = torch.randn(4, 10)
    start -= start.mean(1, keepdim=True)
    limit = (start - teacher) / (10 * 4)
    for t in (100.0, 1000.0):
        student = start.clone().requires_grad_(True)
        kd_loss(student, teacher, t).backward()
        # the distance to the limit shrinks as 1 / T (measured 0.45 / T here)
        assert torch.allclose(student.grad, limit, rtol=0, atol=2 * limit.abs().max().item() / t)


@pytest.fixture(scope="module")
def student_splits():
    return prepare_splits(DataConfig(source="synthetic:300"))


def test_the_teacher_is_frozen_and_sees_the_students_batch_under_the_same_autocast(
        trained_run, student_splits):
    teacher = load_teacher(str(trained_run), student_splits, {}, torch.device("cpu"))
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}

    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0], torch.is_autocast_enabled("cpu"),
                          torch.get_autocast_dtype("cpu"), torch.is_grad_enabled(), output.dtype)
        return hook

    torch.manual_seed(0)
    student = create_model(**model_args("resnet20", 10, 4))
    student.register_forward_hook(record("student"))
    teacher.model.register_forward_hook(record("teacher"))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    step = TrainStep(student, DistillLoss(nn.CrossEntropyLoss(), 4.0, 0.9), optimizer,
                     torch.amp.GradScaler("cpu", enabled=False),
                     torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                     torch.bfloat16, teacher=teacher.model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, _ = step(x, y)

    s_input, s_autocast, s_dtype, s_grad, _ = seen["student"]
    t_input, t_autocast, t_dtype, t_grad, t_out = seen["teacher"]
    assert t_input is s_input  # the very batch, in the step's layout
    assert (t_autocast, t_dtype) == (s_autocast, s_dtype) == (True, torch.bfloat16)
    assert t_out == torch.bfloat16 and s_grad and not t_grad
    assert torch.isfinite(loss)
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    assert all(p.grad is None for p in teacher.model.parameters())
    assert not teacher.model.training


def test_distillation_steps_never_synchronise(trained_run, student_splits):
    """The teacher's forward and the loss add nothing that makes a GPU's host wait."""
    teacher = load_teacher(str(trained_run), student_splits, {}, torch.device("cpu"))
    train_step = step_parts(fused=True)
    train_step.criterion = DistillLoss(SoftTargetCrossEntropy(), 4.0, 0.9)
    train_step.teacher = teacher.model
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % 10
    with SyncOps() as mode:
        for _ in range(2):
            train_step(x, soft_targets(y, 10, 0.1))
    assert mode.seen == []


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.parametrize("model", ["resnet20", "mobilenetv2"])
def test_students_of_two_families_distil_from_a_resnet(trained_run, tmp_path, model):
    teacher_file = trained_run / "best.pt"
    sha = hashlib.sha256(teacher_file.read_bytes()).hexdigest()
    args = [*STUDENT, "--model", model, "--out", str(tmp_path), "--teacher", str(trained_run)]
    assert main([*args, "--name", "kd"]) == 0
    run_dir = tmp_path / "kd"
    teacher = _result(run_dir)["teacher"]
    own = checkpoint.load(teacher_file)
    assert teacher["path"] == str(teacher_file) and teacher["sha256"] == sha
    assert teacher["model"] == "resnet18" and teacher["run_id"] == own["run_id"]
    # the same split of the same data: the teacher scores the student's validation images
    # as it scored its own
    assert teacher["val_acc_on_student_split"] == pytest.approx(own["val_acc"])
    student_keys = set(create_model(**model_args(model, 10, 4)).state_dict())
    for name in ("best.pt", "last.pt"):  # the student's weights only, never the teacher's
        assert set(checkpoint.load(run_dir / name)["model"]) == student_keys
    assert checkpoint.load(run_dir / "last.pt")["train_state"]["teacher"]["sha256"] == sha
    assert "| distilled from | " in (run_dir / "report.md").read_text()
    assert hashlib.sha256(teacher_file.read_bytes()).hexdigest() == sha  # left as it was


def test_alpha_0_trains_as_the_plain_run_and_alpha_above_0_does_not(trained_run, tmp_path):
    """With alpha 0 the teacher runs on every batch but weighs nothing: the run is the
    plain run, metric for metric (on the resident loader; the other tests use the
    torchvision one)."""
    args = [*STUDENT, "--model", "resnet20", "--loader", "resident", "--out", str(tmp_path),
            "--teacher", str(trained_run)]
    assert main([*args, "--name", "kd"]) == 0
    assert main([*args, "--name", "alpha0", "--set", "distill.alpha=0"]) == 0
    assert main([*args[:-2], "--name", "plain"]) == 0
    plain, alpha0, kd = ((tmp_path / n / "metrics.csv").read_text().splitlines()
                         for n in ("plain", "alpha0", "kd"))
    assert _without_seconds(alpha0) == _without_seconds(plain) != _without_seconds(kd)


def _without_seconds(rows: list[str]) -> list[str]:
    return [row.rsplit(",", 1)[0] for row in rows]


def _refused(args: list[str], place: Path, capsys) -> str:
    before = sorted(place.rglob("*"))
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("cifarlab: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert sorted(place.rglob("*")) == before
    return err


def _altered_copy(trained_run: Path, folder: Path, **changes) -> Path:
    ckpt = checkpoint.load(trained_run / "best.pt")
    ckpt.update(changes)
    path = folder / "teacher.pt"
    checkpoint.save_atomic(ckpt, path)
    return path


def test_a_teacher_of_other_classes_is_refused_before_anything_is_written(
        trained_run, tmp_path, capsys):
    classes = checkpoint.load(trained_run / "best.pt")["classes"]
    out = ["--out", str(tmp_path / "runs")]
    path = _altered_copy(trained_run, tmp_path, classes=[f"x{i}" for i in range(10)])
    err = _refused([*STUDENT, *out, "--teacher", str(path)], tmp_path, capsys)
    assert "the teacher predicts the classes ['x0'" in err and "same names" not in err
    path = _altered_copy(trained_run, tmp_path, classes=classes[::-1])
    err = _refused([*STUDENT, *out, "--teacher", str(path)], tmp_path, capsys)
    assert "(the same names in another order)" in err


def test_a_teacher_trained_on_other_images_is_refused_naming_the_difference(
        trained_run, tmp_path, capsys):
    args = [*STUDENT, "--out", str(tmp_path / "runs"), "--teacher", str(trained_run)]
    err = _refused([*args, "--data", "synthetic:400"], tmp_path, capsys)
    assert "trained on other images" in err
    assert "data.source='synthetic:300' (this run: 'synthetic:400')" in err
    err = _refused([*args, "--set", "data.split_seed=7"], tmp_path, capsys)
    assert "data.split_seed=43 (this run: 7)" in err


def test_a_missing_or_foreign_teacher_is_refused(tmp_path, capsys):
    out = ["--out", str(tmp_path / "runs")]
    err = _refused([*STUDENT, *out, "--teacher", str(tmp_path / "nope.pt")], tmp_path, capsys)
    assert f"--teacher {tmp_path / 'nope.pt'}: checkpoint" in err and "no such file" in err
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    err = _refused([*STUDENT, *out, "--teacher", str(text)], tmp_path, capsys)
    assert "not a checkpoint (text file)" in err
    empty = tmp_path / "unfinished"
    empty.mkdir()
    err = _refused([*STUDENT, *out, "--teacher", str(empty)], tmp_path, capsys)
    assert f"--teacher {empty}: checkpoint {empty}: a folder without best.pt" in err


def test_resume_refuses_a_changed_teacher_unless_allowed(trained_run, tmp_path, capsys):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes((trained_run / "best.pt").read_bytes())
    config = apply_dict(get_preset("seed"), {
        "data": {"source": "synthetic:300", "workers": 0}, "epochs": 2, "batch_size": 64,
        "model": {"width": 4}, "optim": {"warmup_epochs": 1}, "out": str(tmp_path),
        "name": "kd", "distill": {"teacher": str(teacher)}})

    def stop_after_the_first_epoch(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, on_epoch=stop_after_the_first_epoch)
    run_dir = tmp_path / "kd"
    assert checkpoint.load(run_dir / "last.pt")["train_state"]["position"] == [2, 0]

    changed = checkpoint.load(teacher)
    first = next(k for k, v in changed["model"].items() if v.is_floating_point())
    changed["model"][first] = changed["model"][first] + 0.01
    checkpoint.save_atomic(changed, teacher)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "the teacher changed" in err and "--allow-changes" in err
    assert not (run_dir / "result.json").exists()
    assert main(["train", "--resume", str(run_dir), "--allow-changes"]) == 0
    assert _result(run_dir)["epochs_run"] == 2


def test_a_compiled_student_learns_from_an_eager_teacher(trained_run, tmp_path, eager_compile):
    torch._dynamo.reset()
    args = [*STUDENT, "--loader", "torchvision", "--out", str(tmp_path), "--teacher",
            str(trained_run)]
    assert main([*args, "--name", "eager"]) == 0
    assert main([*args, "--name", "compiled", "--compile", "default"]) == 0
    assert len(eager_compile) == 1  # the student's model alone; the teacher stays eager
    rows = [(tmp_path / n / "metrics.csv").read_text().splitlines()[1:]
            for n in ("eager", "compiled")]
    for row_a, row_b in zip(*rows, strict=True):
        assert float(row_b.split(",")[2]) == pytest.approx(float(row_a.split(",")[2]), rel=1e-3)
    saved = checkpoint.load(tmp_path / "compiled" / "best.pt")["model"]
    assert set(saved) == set(create_model(**model_args("resnet18", 10, 4)).state_dict())
