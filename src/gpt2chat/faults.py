"""Deterministic fault injection for tests: a kill or a full disk at a named point of a write.

`GPT2CHAT_FAULT` holds comma-separated rules `ACTION:POINT@N`: at the N-th time this process reaches
`fault_point(POINT)`, ACTION happens there.

    kill     SIGKILL this process (no cleanup, no `finally`: what a power cut or the OOM killer does)
    enospc   raise OSError(ENOSPC), as a write to a full disk does
    sigint   send SIGINT to this process, as Ctrl-C in its terminal does (Python raises KeyboardInterrupt)

    GPT2CHAT_FAULT="kill:checkpoint@2"     killed inside the 2nd checkpoint write
    GPT2CHAT_FAULT="enospc:checkpoint@1"   the 1st checkpoint write finds the disk full

Points in the code: `checkpoint` (inside a training checkpoint's staging folder, after the model files and
before the trainer state), `write` (inside `gpt2chat.atomic_files.write_atomic`, the file written but not yet
renamed into place), `swap` (in `gpt2chat.atomic_files.atomic_folder` replacing an existing folder: right after
the one-step exchange, or between the two renames where there is none). Unset, a point costs one
environment lookup. Knows nothing about what is written.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

ENV = "GPT2CHAT_FAULT"
ACTIONS = ("kill", "enospc", "sigint")

_reached: Counter = Counter()  # point -> times reached, while the rules stay the same
_rules_text: str | None = None  # the rules counted so far, as text
_rules: list[tuple[str, str, int]] = []  # ... and parsed


def _parse(text: str) -> list[tuple[str, str, int]]:
    rules = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        action, _, rest = part.partition(":")
        point, _, nth = rest.partition("@")
        if action not in ACTIONS or not point or not nth.isdigit() or int(nth) < 1:
            raise ValueError(f"{ENV}={text!r}: expected ACTION:POINT@N rules with ACTION one of "
                             f"{', '.join(ACTIONS)} and N >= 1, got {part!r}")
        rules.append((action, point, int(nth)))
    return rules


def reset() -> None:
    """Count every point from zero again (tests that reuse the same rules in one process)."""
    global _rules_text
    _rules_text = None
    _reached.clear()


def fault_point(name: str) -> None:
    """Do what `GPT2CHAT_FAULT` says for the present arrival at point `name`; nothing when it is unset."""
    text = os.environ.get(ENV)
    if not text:
        return
    global _rules_text
    if text != _rules_text:  # new rules (a test changed them): parse them once, count from zero again
        _rules[:] = _parse(text)
        _rules_text = text
        _reached.clear()
    _reached[name] += 1
    for action, point, nth in _rules:
        if point == name and nth == _reached[name]:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "sigint":
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs (KeyboardInterrupt) before the next line
                return
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENV} at {name}@{nth})")
