"""The CPU-only install the README describes: PyTorch's CPU build installed first (its own
wheel index, versions such as 2.14.1+cpu), then `make`, which must keep it. Downloading
that build needs download.pytorch.org, so what is checked here is what decides whether pip
keeps it: every requirement on torch and torchvision admits a CPU build's version, and the
Makefile never asks pip to upgrade or reinstall them."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CPU_BUILDS = {"torch": "2.14.1+cpu", "torchvision": "0.29.1+cpu"}


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        found += [Requirement(r) for r in extra]
    return found


def test_every_torch_requirement_admits_the_cpu_build():
    pinned = [r for r in requirements() if r.name in CPU_BUILDS]
    assert {r.name for r in pinned} == set(CPU_BUILDS)  # both are required somewhere
    for r in pinned:
        assert not r.url and not r.extras, r  # no wheel URL or variant that forces a build
        assert r.specifier.contains(CPU_BUILDS[r.name]), r


def test_make_upgrades_nothing_but_pip():
    """`pip install -e '.[test]'` leaves an installed torch alone when it satisfies the
    requirement; --upgrade, --force-reinstall or an index URL would replace it."""
    lines = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines()
             if "pip install" in line]
    assert lines, "the Makefile installs with pip"
    for line in lines:
        options = re.findall(r"(?<!\S)(-U|--upgrade|--force-reinstall|--index-url|-i)(?!\S)",
                             line)
        if line.endswith("--upgrade pip"):
            assert options == ["--upgrade"], line
        else:
            assert options == [], line
