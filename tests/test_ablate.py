"""Ablations: a study's variants (the file format, trial settings, run folder names), Holm's
adjustment, `cifarlab ablate` end to end with its statistics checked against the run
folders, the study summary's HTML and figures, and their bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cifarlab.cli import main
from cifarlab.config import flat_settings
from cifarlab.presets import get_preset
from cifarlab.studies import stats
from cifarlab.studies.ablate import ablation_study, enhancements
from cifarlab.studies.spec import load_study
from cifarlab.studies.summary import load

pytest.importorskip("optuna")  # ablations are studies on Optuna; without it they skip

TINY = {"epochs": 1, "model.width": 4, "data.workers": 0, "batch_size": 64,
        "data.source": "synthetic:100"}
TINY_FLAGS = ["--data", "synthetic:100", "--epochs", "1", "--set", "model.width=4",
              "--set", "data.workers=0", "--set", "batch_size=64",
              "--set", "optim.warmup_epochs=1"]


def write_study(path: Path, **fields) -> Path:
    study = {"preset": "seed", "settings": dict(TINY), "seeds": 1, "sampler": "grid"}
    study.update(fields)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def table(text: str, first_cell: str) -> list[list[str]]:
    """The rows of the Markdown table whose rows start with `first_cell`... (cells split)."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


# ----------------------------------------------------------------------------- statistics

def test_holm_matches_a_hand_worked_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> 0.06 (monotone)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([None, 0.02, 0.5]) == [None, pytest.approx(0.04), pytest.approx(0.5)]
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1, and monotone
    assert stats.holm([]) == []


# ---------------------------------------------------------------------------------- variants

def test_variants_are_one_more_grid_axis_applied_over_the_settings(tmp_path):
    spec = write_study(tmp_path / "v.yaml", seeds=2,
                       settings={**TINY, "optim.label_smoothing": 0.2},
                       variants={"plain": {}, "no-ls": {"optim.label_smoothing": 0.0,
                                                         "optim.lr": 0.05}},
                       space={"optim.momentum": [0.8, 0.9]})
    study = load_study(spec)
    assert list(study.variants) == ["plain", "no-ls"]
    assert len(study.grid()) == 4 and study.budget() == 8
    plain = study.config_for({"variant": "plain", "optim.momentum": 0.8}, 1)
    other = study.config_for({"variant": "no-ls", "optim.momentum": 0.8}, 1)
    assert (plain.optim.label_smoothing, plain.optim.lr, plain.seed) == (0.2, 0.1, 1)
    assert (other.optim.label_smoothing, other.optim.lr, other.optim.momentum) == (0.0, 0.05,
                                                                                   0.8)
    again = load_study(write_study(tmp_path / "again.yaml", **study.to_dict()))
    assert again == study  # study.yaml reads back as the same study


def test_a_sweep_names_run_folders_after_the_variant_and_groups_by_it(tmp_path, capsys):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "s.yaml",
                       settings={**TINY, "data.test_source": "none"},
                       variants={"a": {}, "b": {"optim.label_smoothing": 0.1}},
                       space={"optim.lr": [0.1]})
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "a,optim.lr=0.1,seed=0", "b,optim.lr=0.1,seed=0"]
    config = yaml.safe_load((out / "b,optim.lr=0.1,seed=0" / "config.yaml").read_text())
    assert config["optim"]["label_smoothing"] == 0.1
    assert main(["study", str(out)]) == 0
    text = (out / "study.md").read_text()
    rows = table(text, "a, optim.lr=0.1") + table(text, "b, optim.lr=0.1")
    assert len(rows) == 2 and all(len(r) == 6 for r in rows)  # no test columns: no test split
    assert "No run has a test accuracy" in text
    values = [json.loads((out / n / "result.json").read_text())["best_val_acc"]
              for n in ("a,optim.lr=0.1,seed=0", "b,optim.lr=0.1,seed=0")]
    (by_lr,) = table(text, "0.1 |")  # grouped by the setting alone: both variants pooled
    assert by_lr[1] == "2" and float(by_lr[2]) == pytest.approx(sum(values) / 2, abs=0.006)
    assert [r[1] for r in table(text, "a |") + table(text, "b |")] == ["1", "1"]
    assert (out / "parallel_coordinate.png").stat().st_size > 0
    assert (out / "param_importances.png").stat().st_size > 0  # two parameters


# ----------------------------------------------------------------------------------- ablate

def test_the_ablation_variants_are_what_the_seed_adds_to_the_baseline():
    groups = enhancements()
    assert groups["label-smoothing"] == {"optim.label_smoothing": 0.1}
    assert groups["warmup-cosine"] == {"optim.schedule": "cosine", "optim.warmup_epochs": 5.0}
    assert all(k.startswith("data.augment.") for k in groups["augment"])
    study = ablation_study(3, {"epochs": 7, "optim.warmup_epochs": 1})
    assert list(study.variants) == ["baseline", "augment", "label-smoothing",
                                    "warmup-cosine", "all"]

    def flat(variant: str) -> dict:
        settings = flat_settings(study.config_for({"variant": variant}, 0))
        return {k: v for k, v in settings.items() if k != "preset"}

    seed = {k: v for k, v in flat_settings(get_preset("seed")).items() if k != "preset"}
    assert flat("all") == {**seed, "epochs": 7, "optim.warmup_epochs": 1}
    base = {k: v for k, v in flat_settings(get_preset("baseline")).items() if k != "preset"}
    assert flat("baseline") == {**base, "epochs": 7}  # its own warm-up: none
    alone = {k for k, v in flat("augment").items() if v != flat("baseline")[k]}
    assert alone == set(groups["augment"])


def test_ablate_runs_the_variants_and_its_table_matches_the_run_folders(tmp_path, capsys):
    out = tmp_path / "ablation"
    variants = ["baseline", "label-smoothing", "warmup-cosine"]
    argv = ["ablate", "--seeds", "2", "--variants", "label-smoothing,warmup-cosine",
            "--out", str(out), *TINY_FLAGS]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(f"{v},seed={s}" for v in variants for s in (0, 1))
    results = {name: json.loads((out / name / "result.json").read_text()) for name in folders}
    text = (out / "study.md").read_text()
    assert text in printed
    for measure, first in (("best_val_acc", 0), ("test_acc", 1)):  # validation, then test
        values = {v: [results[f"{v},seed={s}"][measure] for s in (0, 1)] for v in variants}
        rows = {v: table(text, f"{v} |")[first] for v in variants}
        for v in variants:
            s = stats.summarize(values[v], bounds=(0.0, 100.0))
            row = rows[v]
            assert row[1] == "2" and float(row[2]) == pytest.approx(s.mean, abs=0.006)
            assert float(row[3]) == pytest.approx(s.sd, abs=0.006)
            low, high = (float(x) for x in re.findall(r"-?\d+\.\d+", row[4]))
            assert (low, high) == (pytest.approx(s.ci_low, abs=0.006),
                                   pytest.approx(s.ci_high, abs=0.006))
        assert rows["baseline"][5:] == ["-", "-", "-"]
        ps = [stats.welch_p(values[v], values["baseline"]) for v in variants[1:]]
        for v, p, holm in zip(variants[1:], ps, stats.holm(ps), strict=True):
            diff = stats.mean(values[v]) - stats.mean(values["baseline"])
            assert float(rows[v][5]) == pytest.approx(diff, abs=0.006)
            for cell, expected in ((rows[v][6], p), (rows[v][7], holm)):
                assert (cell == "-") if expected is None else (
                    float(cell) == pytest.approx(expected, rel=2e-3, abs=1e-3))
    val = {v: stats.mean([results[f"{v},seed={s}"]["best_val_acc"] for s in (0, 1)])
           for v in variants}
    best = max(variants, key=lambda v: val[v])  # the first of equal means, as in the table
    assert f"Best variant by mean validation accuracy: {best} (" in text

    page = (out / "study.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3  # ablation, history, parallel coords
    assert not re.search(r"(src|href)=\"(https?:|//)", page) and "<link" not in page
    for name in ("ablation.png", "optimization_history.png", "parallel_coordinate.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")

    stamps = {n: (out / n / "result.json").stat().st_mtime_ns for n in folders}
    assert main(argv) == 0  # started again: everything finished, nothing trained again
    assert {n: (out / n / "result.json").stat().st_mtime_ns for n in folders} == stamps
    assert len(load(out)[1].get_trials()) == 6
    capsys.readouterr()
    assert main([*argv[:2], "3", *argv[3:]]) == 2  # another number of seeds: another study
    assert "differs from this file in seeds" in capsys.readouterr().err


# -------------------------------------------------------------------------------- bad input

BAD_ABLATE = [
    (["--variants", "augmnet"], "unknown variant 'augmnet'"),
    (["--set", "seed=1"], "--set seed: each variant runs seeds 0 to N-1"),
    (["--seeds", "0"], "--seeds 0: must be from 1"),
    (["--set", "model.widht=8"], "did you mean 'model.width'"),
    (["--epochs", "0"], "setting 'epochs' must be"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_ABLATE, ids=[m for _, m in BAD_ABLATE])
def test_bad_ablate_arguments_are_refused_in_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "ablation"
    assert main(["ablate", "--out", str(out), "--data", "synthetic:100", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
