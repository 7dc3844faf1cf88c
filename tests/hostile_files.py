"""Stand-ins for hostile checkpoint contents, shared by the checkpoint tests (a plain module: no test
imports another test module)."""

from __future__ import annotations

import os


class RunsCode:
    """Unpickling this calls os.mkdir(marker): a stand-in for arbitrary code in a hostile .bin file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))
