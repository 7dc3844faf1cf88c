"""Building example sets: weights, de-duplication, seeded split, the cache (hits, and misses on every key input)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gpt2chat.data import Budgets, build_preference_examples, build_sft_examples
from gpt2chat.templates import get_template
from gpt2chat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    tokenizer = Tokenizer.gpt2()
    get_template("llama3-context").ensure_tokens(tokenizer)
    get_template("user-assistant").ensure_tokens(tokenizer)
    return tokenizer


def write_alpaca(path, n, offset=0):
    rows = [{"instruction": f"Question {offset + i}?", "input": "", "output": f"Answer {offset + i}."}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f"alpaca:{path}"


def test_weights_subsample_and_repeat(tok, tmp_path):
    a = write_alpaca(tmp_path / "a.jsonl", 40)
    b = write_alpaca(tmp_path / "b.jsonl", 40, offset=100)
    train, val, stats = build_sft_examples([f"{a}@0.5", f"{b}@2"], tok, val_fraction=0.0, use_cache=False)
    from_a = [e for e in train if e.source.startswith(str(tmp_path / "a.jsonl"))]
    from_b = [e for e in train if e.source.startswith(str(tmp_path / "b.jsonl"))]
    assert (len(from_a), len(from_b), len(val)) == (20, 80, 0)
    assert len({tuple(e.input_ids) for e in from_b}) == 40  # every row twice
    assert [s["train_examples"] for s in stats["sources"]] == [20, 80]


def test_exact_dedup_on_normalised_messages(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "Say hi", "input": "", "output": "Hi!"},
            {"instruction": "Say   hi ", "input": "", "output": "Hi!"},  # same after normalising whitespace
            {"instruction": "Say hi", "input": "", "output": "Hello!"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, _, stats = build_sft_examples([f"alpaca:{path}"], tok, val_fraction=0, use_cache=False)
    assert len(train) == 2
    assert stats["sources"][0]["dropped"] == {"duplicate conversation": 1}
    train, _, _ = build_sft_examples([f"alpaca:{path}"], tok, val_fraction=0, dedup=False, use_cache=False)
    assert len(train) == 3


def test_seeded_split_is_disjoint_and_reproducible(tok, tmp_path):
    spec = write_alpaca(tmp_path / "a.jsonl", 50)
    train, val, _ = build_sft_examples(spec, tok, val_fraction=0.2, seed=1, use_cache=False)
    again, val_again, _ = build_sft_examples(spec, tok, val_fraction=0.2, seed=1, use_cache=False)
    other, val_other, _ = build_sft_examples(spec, tok, val_fraction=0.2, seed=2, use_cache=False)
    assert len(val) == 10 and len(train) == 40
    assert not {e.source for e in train} & {e.source for e in val}
    assert [e.source for e in train] == [e.source for e in again] and [e.source for e in val] == [e.source for e in val_again]
    assert {e.source for e in val} != {e.source for e in val_other}


def test_cache_hit_then_miss_on_every_key_input(tok, tmp_path):
    cache = tmp_path / "cache"
    data = tmp_path / "a.jsonl"
    spec = write_alpaca(data, 12)
    base = dict(cache_dir=cache, val_fraction=0.25)
    train, val, stats = build_sft_examples(spec, tok, **base)
    assert stats["cache"] == "miss"
    hit_train, hit_val, hit = build_sft_examples(spec, tok, **base)
    assert hit["cache"] == "hit"
    assert hit_train == train and hit_val == val
    assert hit["train_examples"] == stats["train_examples"]
    entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
    assert {p.suffix for p in entry.iterdir()} == {".npy", ".json"}
    for array in entry.glob("*.npy"):
        np.load(array, allow_pickle=False)

    def misses(**changes):
        args = {**base, **changes}
        template = args.pop("template", "llama3-context")
        tokenizer = args.pop("tokenizer", tok)
        return build_sft_examples(args.pop("spec", spec), tokenizer, template, **args)[2]["cache"] == "miss"

    assert misses(budgets=Budgets(max_length=100))
    assert misses(template="user-assistant")
    assert misses(seed=7)
    assert misses(per_turn=False)
    assert misses(val_fraction=0.5)
    assert misses(spec=spec + "@2")
    bigger = Tokenizer.gpt2()
    get_template("llama3-context").ensure_tokens(bigger)
    bigger.add_special_tokens(["<|extra|>"])
    assert misses(tokenizer=bigger)
    write_alpaca(data, 13)  # the file changes: size and mtime
    os.utime(data, ns=(1, 1))
    assert misses()


def test_preference_build_and_cache(tok, tmp_path):
    path = tmp_path / "u.jsonl"
    rows = [{"prompt": f"Q{i}?", "chosen": f"Right {i}.", "rejected": f"Wrong {i}."} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, val, stats = build_preference_examples(f"ultrafeedback:{path}", tok, cache_dir=tmp_path / "c",
                                                  val_fraction=0.2)
    assert (len(train), len(val), stats["cache"]) == (8, 2, "miss")
    again, _, stats = build_preference_examples(f"ultrafeedback:{path}", tok, cache_dir=tmp_path / "c",
                                                val_fraction=0.2)
    assert stats["cache"] == "hit" and again == train
    assert stats["loss_fraction"] > 0
