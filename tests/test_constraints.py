"""constraints.txt, the versions README's install takes: it pins every requirement pyproject.toml names,
each pin inside its range, and .ci/constraints.py reports what moved."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ci_constraints", REPO / ".ci" / "constraints.py")
constraints = importlib.util.module_from_spec(spec)
spec.loader.exec_module(constraints)


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in map(Requirement, lines) if canonicalize_name(r.name) != "gpt2chat"]


def test_every_requirement_of_pyproject_is_pinned_inside_its_range():
    pins = constraints.read(REPO / "constraints.txt")
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is in pyproject.toml but not in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}")


def test_the_pins_are_exact_versions_and_name_no_path_or_the_package_itself():
    lines = [ln for ln in (REPO / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    names = [line.partition("==")[0] for line in lines]
    assert names == sorted(names)
    for line in lines:
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line and "@" not in line, line
        assert canonicalize_name(name) != "gpt2chat"
    assert "torch==2.13.0" in lines  # not 2.13.0+cpu: the pin must also match the registry's wheel name


def test_diff_names_a_moved_an_unpinned_and_a_dropped_distribution():
    pinned = {"torch": "2.13.0", "trl": "1.16.0", "old": "1.0"}
    installed = {"torch": "2.13.0+cpu", "trl": "1.17.0", "new": "0.1"}
    assert constraints.diff(pinned, installed) == [
        "new: (not pinned) -> 0.1", "old: 1.0 -> (not required now)", "trl: 1.16.0 -> 1.17.0"]


def test_the_closure_of_this_venv_covers_pyproject_and_matches_the_pins(tmp_path):
    found = constraints.closure(extras=("dev", "harness", "hub"))
    assert {canonicalize_name(r.name) for r in requirements()} <= set(found)
    written = tmp_path / "constraints.txt"
    written.write_text(constraints.render(found))
    assert constraints.read(written) == {k: v.split("+")[0] if k == "torch" else v for k, v in found.items()}
