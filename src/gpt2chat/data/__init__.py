"""Datasets -> conversations / preference pairs -> token ids with loss masks.

    rows.py      specs (FORMAT:LOCATION[@WEIGHT]) and raw rows with provenance (json, jsonl, parquet, hub)
    formats.py   one parser per row format, field and turn-order checks
    oasst.py     OpenAssistant message tables -> trees -> best-ranked (or all) paths
    load.py      load_conversations / load_preferences with a LoadReport (skip + count, or strict)
    examples.py  rendering through a template inside token budgets
    mixing.py    weights, de-duplication, seeded split, cache -> build_sft_examples / build_preference_examples
    cache.py     the tokenized-result cache (NumPy arrays + JSON, never pickle)
    report.py    statistics and marked-up examples for `gpt2chat data inspect|stats`
    samples.py   the small quickstart data shipped in gpt2chat/resources

Importing this package needs neither torch nor a tokenizer.
"""

from gpt2chat.data.formats import FORMATS, FormatOptions
from gpt2chat.data.load import is_preference_source, load_conversations, load_preferences
from gpt2chat.data.mixing import build_preference_examples, build_sft_examples
from gpt2chat.data.rows import Spec, parse_spec
from gpt2chat.data.types import (
    PREFERENCE_BUDGETS,
    SFT_BUDGETS,
    Budgets,
    Conversation,
    DataError,
    LoadReport,
    PreferenceExample,
    PreferencePair,
    SFTExample,
)

SAMPLE = "sample"  # what --data takes for the packaged sample, on every command
SAMPLE_SFT_SPEC = "messages:package:quickstart_sft.jsonl"
SAMPLE_PREF_SPEC = "ultrafeedback:package:quickstart_pref.jsonl"


def sample_specs(specs: list[str], preference: bool) -> list[str]:
    """`sample` -> the packaged sample of that kind (conversations, or preference pairs); other specs as given."""
    sample = SAMPLE_PREF_SPEC if preference else SAMPLE_SFT_SPEC
    return [sample if spec == SAMPLE else spec for spec in specs]

__all__ = [
    "FORMATS", "PREFERENCE_BUDGETS", "SAMPLE", "SAMPLE_PREF_SPEC", "SAMPLE_SFT_SPEC", "SFT_BUDGETS", "Budgets",
    "Conversation", "DataError", "FormatOptions", "LoadReport", "PreferenceExample", "PreferencePair",
    "SFTExample", "Spec", "build_preference_examples", "build_sft_examples", "is_preference_source",
    "load_conversations", "load_preferences", "parse_spec", "sample_specs",
]
