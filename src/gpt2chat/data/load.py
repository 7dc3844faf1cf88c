"""Specs -> conversations / preference pairs, with a `LoadReport` of every row read, kept or skipped.

`strict=False` (default): a malformed row is skipped, counted by reason and its message kept for the summary.
`strict=True`: the first malformed row stops with a `DataError` naming the file, the line / row and the field.
Choices that are not faults (deleted OASST messages, other languages, broken trees) are only counted.
"""

from __future__ import annotations

from gpt2chat.data.formats import (
    CONVERSATION_PARSERS,
    FORMATS,
    PREFERENCE_PARSERS,
    TABLE_FORMATS,
    FormatOptions,
    parsed_rows,
)
from gpt2chat.data.oasst import oasst_conversations
from gpt2chat.data.rows import Spec, iter_rows, parse_spec
from gpt2chat.data.types import Conversation, DataError, LoadReport, PreferencePair


def as_spec(spec: str | Spec) -> Spec:
    return spec if isinstance(spec, Spec) else parse_spec(spec, FORMATS)


def load_conversations(spec: str | Spec, strict: bool = False,
                       options: FormatOptions | None = None) -> tuple[list[Conversation], LoadReport]:
    """Read one source into conversations (preference formats give prompt + chosen reply)."""
    spec = as_spec(spec)
    options = options or FormatOptions()
    report = LoadReport(source=str(spec))
    rows = iter_rows(spec.location)
    if spec.format in TABLE_FORMATS:
        conversations = oasst_conversations(rows, report, options, strict)
    else:
        parser = CONVERSATION_PARSERS[spec.format]
        conversations = [Conversation(messages=messages, source=raw.where.source)
                         for messages, raw in parsed_rows(rows, lambda raw: parser(raw.data, options),
                                                          report, strict)]
    report.kept = len(conversations)
    return conversations, report


def load_preferences(spec: str | Spec, strict: bool = False,
                     options: FormatOptions | None = None) -> tuple[list[PreferencePair], LoadReport]:
    """Read one preference source (`ultrafeedback`, or `sharegpt` with chosen / rejected) into pairs."""
    spec = as_spec(spec)
    if spec.format not in PREFERENCE_PARSERS:
        raise DataError(f"data spec {str(spec)!r}: format {spec.format!r} has no preference pairs; "
                        f"preference formats: {', '.join(PREFERENCE_PARSERS)}")
    options = options or FormatOptions()
    parser = PREFERENCE_PARSERS[spec.format]
    report = LoadReport(source=str(spec))
    pairs = []
    for pair, raw in parsed_rows(iter_rows(spec.location), lambda raw: parser(raw.data, options),
                                 report, strict):
        pair.source = raw.where.source
        pairs.append(pair)
    report.kept = len(pairs)
    return pairs, report


def is_preference_source(spec: str | Spec) -> bool:
    """Whether a source holds preference pairs: ultrafeedback always, sharegpt when its rows have chosen."""
    spec = as_spec(spec)
    if spec.format == "ultrafeedback":
        return True
    if spec.format != "sharegpt":
        return False
    for raw in iter_rows(spec.location):
        if raw.data is not None:
            return "chosen" in raw.data and "rejected" in raw.data
    return False

