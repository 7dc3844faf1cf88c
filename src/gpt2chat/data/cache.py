"""A folder cache of tokenized examples, so a second build with the same inputs does not tokenize again.

The key is a hash of everything the result depends on: each source's format, weight and file fingerprint
(path, size, mtime; the id for a hub dataset), the tokenizer (size, added tokens, ids of a probe text), the
template (its name and the ids it renders for a probe conversation, so a changed template misses too), the
budgets and every option. An entry is a folder of NumPy `.npy` arrays (flat ids + offsets, read back with
`allow_pickle=False`) and a `meta.json`; it is written to a temporary folder and renamed into place. Never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from gpt2chat.atomic_files import atomic_folder
from gpt2chat.data.types import PreferenceExample, SFTExample

CACHE_VERSION = 3  # 2: stats carry the split record (mixing.py); 3: messages rows with tools / tool turns load
PROBE_TEXT = "Hello, world! 2 + 2 = 4. Ünïcödé <|endoftext|> 😊"
PROBE_MESSAGES = [  # with a tool round, so a change in how tool turns render misses too
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
    {"role": "tool", "content": "ok"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
]


def default_cache_dir() -> Path:
    if os.environ.get("GPT2CHAT_CACHE"):
        return Path(os.environ["GPT2CHAT_CACHE"]) / "data"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "gpt2chat" / "data"


def tokenizer_fingerprint(tokenizer) -> dict:
    base_size = 50257
    added = [tokenizer.id_to_token(i) for i in range(base_size, len(tokenizer))]
    return {"size": len(tokenizer), "added": added, "probe": tokenizer.encode(PROBE_TEXT)}


def template_fingerprint(tokenizer, template) -> dict:
    from gpt2chat.templates import render_chat

    ids, mask = render_chat(tokenizer, PROBE_MESSAGES, template=template, add_generation_prompt=False)
    prompt_ids, _ = render_chat(tokenizer, PROBE_MESSAGES[:-1], template=template, add_generation_prompt=True)
    name = template if isinstance(template, str) else getattr(template, "name", repr(template))
    return {"name": name, "ids": list(ids), "mask": list(mask), "prompt": list(prompt_ids)}


def cache_key(parts: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _pack(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sequences], out=offsets[1:])
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def _unpack(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    values = flat.tolist()
    bounds = offsets.tolist()
    return [values[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


FIELDS = {"sft": ("input_ids", "assistant_mask"), "preference": ("prompt_ids", "chosen_ids", "rejected_ids")}
CLASSES = {"sft": SFTExample, "preference": PreferenceExample}


def save_entry(directory: Path, key: str, kind: str, splits: dict[str, list], stats: dict) -> Path:
    final = directory / key
    with atomic_folder(final) as staging:
        meta = {"version": CACHE_VERSION, "kind": kind, "stats": stats, "sources": {}}
        for split, examples in splits.items():
            for name in FIELDS[kind]:
                flat, offsets = _pack([getattr(e, name) for e in examples])
                np.save(staging / f"{split}.{name}.npy", flat, allow_pickle=False)
                np.save(staging / f"{split}.{name}.offsets.npy", offsets, allow_pickle=False)
            meta["sources"][split] = [e.source for e in examples]
        (staging / "meta.json").write_text(json.dumps(meta))
    return final


def load_entry(directory: Path, key: str, kind: str) -> tuple[dict[str, list], dict] | None:
    """The cached splits and stats, or None when absent or unreadable (then the caller rebuilds)."""
    entry = directory / key
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("kind") != kind:
            return None
        splits = {}
        for split, sources in meta["sources"].items():
            columns = []
            for name in FIELDS[kind]:
                flat = np.load(entry / f"{split}.{name}.npy", allow_pickle=False)
                offsets = np.load(entry / f"{split}.{name}.offsets.npy", allow_pickle=False)
                columns.append(_unpack(flat, offsets))
            if any(len(column) != len(sources) for column in columns):
                return None
            splits[split] = [CLASSES[kind](*values, source) for *values, source in zip(*columns, sources, strict=True)]
        return splits, meta["stats"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
