"""Write or check constraints.txt: the exact versions of gpt2chat's dependencies that the tests passed with.

    python .ci/constraints.py --write      # constraints.txt from this venv (after its test run passed)
    python .ci/constraints.py --diff       # how this venv differs from constraints.txt (the newest-versions job)
    python .ci/constraints.py --check --extras dev,harness   # exit 1 if an installed requirement is not its pin

Run it with the venv's own interpreter (`.venv/bin/python .ci/constraints.py ...`). The file lists every
distribution in the dependency closure of `gpt2chat[dev,harness,hub]` as installed here, one `name==version`
a line: what gpt2chat, its extras and their requirements need, walked through the installed metadata with
the markers of this interpreter. Nothing else that happens to be in the venv is listed, and gpt2chat itself
is not. `pip install -c constraints.txt ...` then installs those versions and nothing newer (a constraint
only applies to a package that something requires). The refresh is in README.md ("Dependencies").
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = "gpt2chat"
EXTRAS = ("dev", "harness", "hub")
FILE = Path(__file__).resolve().parents[1] / "constraints.txt"
HEADER = """\
# The versions gpt2chat's tests passed with: the dependency closure of gpt2chat[dev,harness,hub].
# Written by `.venv/bin/python .ci/constraints.py --write` ({python} {machine}); do not edit by hand:
# add or change a dependency in pyproject.toml, then refresh as README.md ("Dependencies") says.
# Used by README's install command, .ci/run and benchmarks/README.md: pip install -c constraints.txt ...
# torch is the CPU wheel (2.13.0+cpu here); `torch==2.13.0` matches it and keeps pip off the CUDA builds.
"""


def closure(root: str = ROOT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of everything `root[extras]` requires, transitively."""
    found: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset(extras))]
    done: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, wanted = pending.pop()
        key = (canonicalize_name(name), wanted)
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {name} is required but not installed in {sys.prefix}") from None
        if canonicalize_name(name) != canonicalize_name(root):
            found[canonicalize_name(name)] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": extra}) for extra in wanted or {""}):
                continue
            pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def read(path: Path = FILE) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def render(pins: dict[str, str]) -> str:
    header = HEADER.format(python=f"Python {platform.python_version()}", machine=platform.machine())
    lines = [f"{name}=={version.split('+')[0] if name == 'torch' else version}" for name, version in sorted(pins.items())]
    return header + "\n".join(lines) + "\n"


def diff(pinned: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per distribution whose installed version is not its pin, or that only one side has."""
    lines = []
    for name in sorted(set(pinned) | set(installed)):
        was, now = pinned.get(name), installed.get(name)
        if was is not None and now is not None and now.split("+")[0] == was.split("+")[0]:
            continue
        lines.append(f"{name}: {was or '(not pinned)'} -> {now or '(not required now)'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write constraints.txt from this venv")
    mode.add_argument("--diff", action="store_true", help="print how this venv differs from constraints.txt")
    mode.add_argument("--check", action="store_true",
                      help="like --diff, and exit 1 if a requirement installed here is unpinned or not at its pin")
    parser.add_argument("--file", type=Path, default=FILE)
    parser.add_argument("--extras", default=",".join(EXTRAS), help="the extras of gpt2chat installed here")
    args = parser.parse_args(argv)
    extras = tuple(e for e in args.extras.split(",") if e)
    if args.write and extras != EXTRAS:
        parser.error(f"--write pins the closure of every extra ({','.join(EXTRAS)}); install them all first")
    installed = closure(extras=extras)
    if args.write:
        args.file.write_text(render(installed))
        print(f"wrote {len(installed)} pins to {args.file}")
        return 0
    pinned = read(args.file)
    changes = diff(pinned, installed)
    # with fewer extras installed, a pin may have nothing requiring it here: not a difference that matters
    moved = [line for line in changes if not line.endswith("(not required now)")]
    print(f"{len(moved)} of {len(installed)} dependencies differ from {args.file.name}")
    for line in moved:
        print(f"  {line}")
    return 1 if args.check and moved else 0


if __name__ == "__main__":
    raise SystemExit(main())
