"""The one base class for errors caused by bad input (files, configs, requests, chat text).

The CLI turns these into a one-line `error: ...` and exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class Gpt2ChatError(ValueError):
    """Bad input from outside: the message says what is wrong and where."""
