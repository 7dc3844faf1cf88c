"""Data specs and raw rows: `FORMAT:LOCATION[@WEIGHT]` -> an iterator of (row dict | problem, where it came from).

LOCATION is a local json / jsonl / parquet file, a folder of them, `package:NAME` (a file shipped in
`gpt2chat/resources`), or a Hugging Face hub id (`owner/name`, optional `#split`) loaded through `datasets` when
the hub can be reached. Offline (HF_HUB_OFFLINE=1, or no route to the hub) a hub id fails at once with a clear
message: nothing here ever waits on the network.

This module knows files and rows only: nothing about formats, messages or tokens. A row that cannot be read
(invalid JSON, not an object) comes out as a `RawRow` with `problem` set, so the caller decides whether to skip
and count it or stop. Bytes that are not UTF-8 are decoded with `surrogateescape`: the field that holds them is
then named by the format parser's text check.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2chat.data.types import DataError

SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(#[\w.\-/]+)?$")
_WEIGHT = re.compile(r"^[0-9.eE+-]+$")


@dataclass(frozen=True)
class Spec:
    """A parsed data spec."""

    format: str
    location: str
    weight: float = 1.0
    raw: str = ""

    def __str__(self) -> str:
        return self.raw or f"{self.format}:{self.location}"


def parse_spec(text: str, known_formats: tuple[str, ...]) -> Spec:
    """`FORMAT:LOCATION[@WEIGHT]` -> Spec; unknown formats and bad weights are errors that quote the spec."""
    if isinstance(text, Spec):
        return text
    text = str(text).strip()
    fmt, sep, rest = text.partition(":")
    if not sep or not fmt or not rest:
        raise DataError(f"data spec {text!r}: expected FORMAT:LOCATION[@WEIGHT], e.g. alpaca:data/alpaca.json")
    fmt = fmt.strip().lower()
    if fmt not in known_formats:
        raise DataError(f"data spec {text!r}: unknown format {fmt!r}; known formats: {', '.join(known_formats)}")
    weight = 1.0
    location, at, weight_text = rest.rpartition("@")
    if at and _WEIGHT.match(weight_text):
        try:
            weight = float(weight_text)
        except ValueError:
            raise DataError(f"data spec {text!r}: weight {weight_text!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"data spec {text!r}: weight must be a number > 0, got {weight_text}")
    else:
        location = rest
    if not location:
        raise DataError(f"data spec {text!r}: empty location")
    return Spec(format=fmt, location=location, weight=weight, raw=text)


@dataclass(frozen=True)
class Where:
    """Where a row came from: a file line (jsonl), a row index (json array, parquet, hub)."""

    file: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file} line {self.line}"
        if self.index is not None:
            return f"{self.file} row {self.index}"
        return self.file

    @property
    def source(self) -> str:
        """The short id stored on a Conversation: `file:line` or `file#row`."""
        if self.line is not None:
            return f"{self.file}:{self.line}"
        return f"{self.file}#{self.index}"


@dataclass
class RawRow:
    data: dict | None
    where: Where
    problem: tuple[str, str] | None = None  # (reason, message) when the row itself could not be read


# ---------------------------------------------------------------- locations


def resource_path(name: str) -> Path:
    """A file shipped inside the package (`gpt2chat/resources/NAME`)."""
    from importlib import resources

    return Path(str(resources.files("gpt2chat").joinpath("resources", name)))


def resolve_files(location: str) -> list[Path] | None:
    """Local files for a location, or None when it names a hub dataset. Missing local paths are errors."""
    if location.startswith("package:"):
        path = resource_path(location.removeprefix("package:"))
        if not path.is_file():
            raise DataError(f"packaged data file not found: {location} (looked at {path})")
        return [path]
    path = Path(location).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"data folder {location} holds no {'/'.join(SUFFIXES)} files")
        return files
    if HUB_ID.match(location) and Path(location).suffix.lower() not in SUFFIXES:
        return None
    raise DataError(f"data file not found: {location}")


def location_fingerprint(location: str) -> list:
    """What identifies a location's contents cheaply: (path, size, mtime) per file, or the hub id."""
    files = resolve_files(location)
    if files is None:
        return [["hub", location]]
    out = []
    for path in files:
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


# ---------------------------------------------------------------- rows


def iter_rows(location: str) -> Iterator[RawRow]:
    files = resolve_files(location)
    if files is None:
        yield from _iter_hub(location)
        return
    for path in files:
        display = location if len(files) == 1 and not location.startswith("package:") else str(path)
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from _iter_parquet(path, display)
        elif suffix == ".jsonl":
            yield from _iter_jsonl(path, display)
        else:
            yield from _iter_json(path, display)


def _object_or_problem(value, where: Where) -> RawRow:
    if isinstance(value, dict):
        return RawRow(value, where)
    kind = type(value).__name__ if value is not None else "null"
    return RawRow(None, where, ("not an object", f"{where}: row is a JSON {kind}, expected an object"))


def _iter_jsonl(path: Path, display: str) -> Iterator[RawRow]:
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            where = Where(display, line=line_number)
            text = raw.decode("utf-8", errors="surrogateescape")
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(None, where, ("invalid JSON", f"{where}: invalid JSON: {exc.msg} (column {exc.colno})"))
                continue
            yield _object_or_problem(value, where)


def _iter_json(path: Path, display: str) -> Iterator[RawRow]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        first_line = text.lstrip().split("\n", 1)[0]
        if first_line.startswith("{") and _parses(first_line):  # JSON lines saved as .json
            yield from _iter_jsonl(path, display)
            return
        raise DataError(f"{display} line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(document) == 1 and len(lists) == 1:  # {"data": [...]} / {"train": [...]}
            document = lists[0]
        else:
            document = [document]
    if not isinstance(document, list):
        raise DataError(f"{display}: expected a JSON array of rows, got a {type(document).__name__}")
    for index, value in enumerate(document):
        yield _object_or_problem(value, Where(display, index=index))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _iter_parquet(path: Path, display: str) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{display}: reading parquet needs pyarrow (pip install 'gpt2chat[hub]')") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{display}: not a readable parquet file ({exc})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for value in batch.to_pylist():
            yield _object_or_problem(value, Where(display, index=index))
            index += 1


# ---------------------------------------------------------------- hub


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now, or None. Never blocks for more than ~3 seconds."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0]
    hostname, _, port = host.partition(":")
    try:
        with socket.create_connection((hostname, int(port or 443)), timeout=3):
            return None
    except OSError as exc:
        return f"cannot reach {hostname} ({exc.__class__.__name__})"


def _iter_hub(location: str) -> Iterator[RawRow]:
    hub_id, _, split = location.partition("#")
    split = split or "train"
    reason = hub_offline_reason()
    if reason is not None:
        raise DataError(f"{location}: not a local file, and the Hugging Face hub is unavailable ({reason}); "
                        "pass a local json / jsonl / parquet file or folder instead")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{location}: loading hub datasets needs `datasets` (pip install 'gpt2chat[hub]')") from None
    try:
        dataset = datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise DataError(f"{location}: could not load hub dataset {hub_id!r} split {split!r}: {exc}") from None
    display = f"{hub_id}#{split}"
    for index, value in enumerate(dataset):
        yield _object_or_problem(value, Where(display, index=index))
