"""Several sources -> one seeded train / validation set of tokenized examples (cached).

Order of work, each step seeded and counted in `stats`:
1. load every source (`load.py`), skipping (or, strict, stopping at) malformed rows;
2. de-duplicate exactly on normalised messages (NFC, whitespace runs collapsed), across sources, first wins;
3. split each source's conversations into train / validation (so turns of one conversation never straddle the
   split); SFT targets (one per assistant turn by default) are de-duplicated again, validation losing those
   already in train;
4. tokenize (`examples.py`);
5. weight the training part of each source: weight < 1 keeps a seeded sample, > 1 repeats (whole copies plus a
   seeded sample for the fraction); the validation part is never repeated. Shuffle train with the seed.
The result is cached (`cache.py`) under a key of every input, so a second identical build does not tokenize.
`stats["split"]` records the validation rows as rows (messages, or prompt / chosen / rejected) and the content
hashes of the training rows (`content_hash`), so evaluation can score held-out rows only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from gpt2chat.data.cache import (
    cache_key,
    default_cache_dir,
    load_entry,
    save_entry,
    template_fingerprint,
    tokenizer_fingerprint,
)
from gpt2chat.data.examples import (
    PrefetchedTokenizer,
    build_preferences,
    build_sft,
    sft_turn_targets,
    unwrap,
)
from gpt2chat.data.formats import FormatOptions
from gpt2chat.data.load import as_spec, load_conversations, load_preferences
from gpt2chat.data.report import example_stats, preference_stats
from gpt2chat.data.rows import Spec, location_fingerprint
from gpt2chat.data.types import VAL_FRACTION, Budgets, DataError, PreferenceExample, SFTExample

_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


def messages_key(messages: list[dict]) -> tuple:
    return tuple((m["role"], normalise(m["content"])) for m in messages)


def content_hash(messages: list[dict]) -> str:
    """64-bit hex hash of a conversation as `messages_key` sees it: the identity of a row across files."""
    text = json.dumps(messages_key(messages), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def training_hashes(messages: list[dict]) -> list[str]:
    """Hashes of every prefix of a training conversation that ends in an assistant reply (each one a target,
    or context the model read)."""
    return [content_hash(messages[: end + 1]) for end, m in enumerate(messages) if m["role"] == "assistant"]


def pair_hashes(prompt: list[dict], chosen: str, rejected: str) -> list[str]:
    """Hashes of a preference pair's two conversations: prompt + chosen, prompt + rejected."""
    return [content_hash([*prompt, {"role": "assistant", "content": reply}]) for reply in (chosen, rejected)]


def _stop_at_first_drop(items: list, source_of, build) -> None:
    """strict: DataError naming the first item the budgets drop and why (built again one at a time, which
    only a failing strict run pays for)."""
    for item in items:
        drops: Counter = Counter()
        build(item, drops)
        if drops:
            reason = next(iter(drops))
            raise DataError(f"{source_of(item) or 'a row'}: {reason} (strict: stopped at the first dropped row; "
                            "raise the budgets or leave strict off to drop such rows)")


def split_indices(n: int, val_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    if val_fraction > 0 and n >= 2:
        n_val = max(1, min(n_val, n - 1))
    return sorted(order[n_val:]), sorted(order[:n_val])


def apply_weight(items: list, weight: float, rng: random.Random) -> list:
    """weight < 1: a seeded sample of round(weight * n); > 1: whole copies plus a sample for the fraction."""
    copies, fraction = divmod(weight, 1.0)
    out = list(items) * int(copies)
    extra = int(round(fraction * len(items)))
    if extra:
        out.extend(rng.sample(items, extra))
    return out


def _specs(specs: str | Spec | Sequence[str | Spec]) -> list[Spec]:
    if isinstance(specs, (str, Spec)):
        specs = [specs]
    parsed = [as_spec(s) for s in specs]
    if not parsed:
        raise DataError("no data source given (expected at least one FORMAT:LOCATION spec)")
    return parsed


def _template_name(template) -> str:
    return template if isinstance(template, str) else template.name


def _key(kind, specs, tokenizer, template, budgets, settings) -> str:
    return cache_key({
        "kind": kind,
        "sources": [[s.format, s.weight, location_fingerprint(s.location)] for s in specs],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template_fingerprint(tokenizer, template),
        "budgets": [budgets.max_prompt_length, budgets.max_response_length, budgets.max_length,
                    budgets.prompt_truncation],
        "settings": settings,
    })


def _cached(kind, key, cache_dir, use_cache):
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    hit = load_entry(directory, key, kind) if use_cache else None
    return directory, hit


def _from_cache(hit, directory: Path, key: str) -> tuple[list, list, dict]:
    splits, stats = hit
    return splits["train"], splits["val"], {**stats, "cache": "hit", "cache_path": str(directory / key)}


def _store(kind: str, directory: Path, key: str, train: list, val: list, stats: dict, started: float,
           use_cache: bool) -> tuple[list, list, dict]:
    """Stamp the build time, write the cache entry, and return (train, val, stats) of a cache miss."""
    stats["seconds"] = round(time.perf_counter() - started, 3)
    if use_cache:
        save_entry(directory, key, kind, {"train": train, "val": val}, stats)
    return train, val, {**stats, "cache": "miss", "cache_path": str(directory / key) if use_cache else None}


def _unique(items: list, item_key, seen: set, report, reason: str) -> list:
    """Items whose key is not in `seen` yet (adding theirs); each repeat is a counted drop on `report`."""
    unique = []
    for item in items:
        k = item_key(item)
        if k in seen:
            report.drop(reason)
        else:
            seen.add(k)
            unique.append(item)
    return unique


def _weighted(spec: Spec, source_train: list, source_val: list, rng: random.Random) -> tuple[list, list]:
    """Apply a source's mixing weight: the train split by sampling / repeating, val only subsampled."""
    weighted = apply_weight(source_train, spec.weight, rng)
    if spec.weight < 1:
        source_val = apply_weight(source_val, spec.weight, rng)
    return weighted, source_val


def build_sft_examples(specs, tokenizer, template="llama3-context", budgets: Budgets | None = None, *,
                       val_fraction: float = VAL_FRACTION, seed: int = 0, per_turn: bool = True, dedup: bool = True,
                       strict: bool = False, options: FormatOptions | None = None, cache_dir=None,
                       use_cache: bool = True) -> tuple[list[SFTExample], list[SFTExample], dict]:
    """Specs -> (train, val, stats) SFT examples. `stats["cache"]` says "hit" or "miss"."""
    specs, budgets, options = _specs(specs), budgets or Budgets.sft(), options or FormatOptions()
    _check_fraction(val_fraction)
    settings = {"val_fraction": val_fraction, "seed": seed, "per_turn": per_turn, "dedup": dedup,
                "strict": strict, "options": options.key()}
    key = _key("sft", specs, tokenizer, template, budgets, settings)
    directory, hit = _cached("sft", key, cache_dir, use_cache)
    if hit is not None:
        return _from_cache(hit, directory, key)

    started = time.perf_counter()
    rng = random.Random(seed)
    seen_conversations: set[tuple] = set()
    fast = PrefetchedTokenizer(unwrap(tokenizer))
    train: list[SFTExample] = []
    val: list[SFTExample] = []
    stats = {"kind": "sft", "template": _template_name(template), "sources": [], "dropped": Counter(),
             "truncated": Counter()}
    heldout, trained = [], set()  # stats["split"]: what evaluation needs to score held-out rows only
    for spec in specs:
        conversations, report = load_conversations(spec, strict=strict, options=options)
        if dedup:
            conversations = _unique(conversations, lambda c: messages_key(c.messages), seen_conversations,
                                    report, "duplicate conversation")
        train_idx, val_idx = split_indices(len(conversations), val_fraction, rng)
        heldout += [{"messages": conversations[i].messages, "source": conversations[i].source} for i in val_idx]
        trained.update(h for i in train_idx for h in training_hashes(conversations[i].messages))
        split_targets = {}
        seen_targets: set[tuple] = set()
        for split, indices in (("train", train_idx), ("val", val_idx)):
            targets = []
            for index in indices:
                for messages in sft_turn_targets(conversations[index], per_turn):
                    k = messages_key(messages)
                    if dedup and k in seen_targets:
                        stats["dropped"]["duplicate turn"] += 1
                        continue
                    seen_targets.add(k)
                    targets.append((messages, conversations[index].source))
            split_targets[split] = targets
        drops: Counter = Counter()
        source_train = build_sft(fast, [], template, budgets, per_turn, drops, targets=split_targets["train"],
                                 truncations=stats["truncated"])
        source_val = build_sft(fast, [], template, budgets, per_turn, drops, targets=split_targets["val"],
                               truncations=stats["truncated"])
        if strict and drops:
            _stop_at_first_drop(split_targets["train"] + split_targets["val"], lambda item: item[1],
                                lambda item, d: build_sft(fast, [], template, budgets, per_turn, d, targets=[item]))
        stats["dropped"].update(drops)
        weighted, source_val = _weighted(spec, source_train, source_val, rng)
        train.extend(weighted)
        val.extend(source_val)
        stats["sources"].append({**report.to_dict(), "weight": spec.weight, "conversations": len(conversations),
                                 "train_examples": len(weighted), "val_examples": len(source_val),
                                 "example_drops": dict(drops)})
    rng.shuffle(train)
    _no_empty_masks(train, val)
    stats.update(example_stats(train, val))
    stats["dropped"], stats["truncated"] = dict(stats["dropped"]), dict(stats["truncated"])
    stats["split"] = {"heldout": heldout, "train_hashes": sorted(trained)}
    return _store("sft", directory, key, train, val, stats, started, use_cache)


def build_preference_examples(specs, tokenizer, template="llama3-context", budgets: Budgets | None = None, *,
                              val_fraction: float = VAL_FRACTION, seed: int = 0, dedup: bool = True, strict: bool = False,
                              options: FormatOptions | None = None, cache_dir=None,
                              use_cache: bool = True) -> tuple[list[PreferenceExample], list[PreferenceExample], dict]:
    """Specs -> (train, val, stats) preference examples (budgets default to seed 002's 96 / 64 / 160)."""
    specs, budgets, options = _specs(specs), budgets or Budgets.preference(), options or FormatOptions()
    _check_fraction(val_fraction)
    settings = {"val_fraction": val_fraction, "seed": seed, "dedup": dedup, "strict": strict,
                "options": options.key()}
    key = _key("preference", specs, tokenizer, template, budgets, settings)
    directory, hit = _cached("preference", key, cache_dir, use_cache)
    if hit is not None:
        return _from_cache(hit, directory, key)

    started = time.perf_counter()
    rng = random.Random(seed)
    seen: set[tuple] = set()
    fast = PrefetchedTokenizer(unwrap(tokenizer))
    train: list[PreferenceExample] = []
    val: list[PreferenceExample] = []
    stats = {"kind": "preference", "template": _template_name(template), "sources": [], "dropped": Counter(),
             "truncated": Counter()}
    heldout, trained = [], set()
    for spec in specs:
        pairs, report = load_preferences(spec, strict=strict, options=options)
        if dedup:
            pairs = _unique(pairs, lambda p: (messages_key(p.prompt), normalise(p.chosen), normalise(p.rejected)),
                            seen, report, "duplicate pair")
        train_idx, val_idx = split_indices(len(pairs), val_fraction, rng)
        heldout += [{"prompt": pairs[i].prompt, "chosen": pairs[i].chosen, "rejected": pairs[i].rejected,
                     "source": pairs[i].source} for i in val_idx]
        trained.update(h for i in train_idx for h in pair_hashes(pairs[i].prompt, pairs[i].chosen, pairs[i].rejected))
        drops: Counter = Counter()
        source_train = build_preferences(fast, [pairs[i] for i in train_idx], template, budgets, drops,
                                         stats["truncated"])
        source_val = build_preferences(fast, [pairs[i] for i in val_idx], template, budgets, drops,
                                       stats["truncated"])
        if strict and drops:
            _stop_at_first_drop([pairs[i] for i in train_idx + val_idx], lambda pair: pair.source,
                                lambda pair, d: build_preferences(fast, [pair], template, budgets, d))
        stats["dropped"].update(drops)
        weighted, source_val = _weighted(spec, source_train, source_val, rng)
        train.extend(weighted)
        val.extend(source_val)
        stats["sources"].append({**report.to_dict(), "weight": spec.weight, "pairs": len(pairs),
                                 "train_examples": len(weighted), "val_examples": len(source_val),
                                 "example_drops": dict(drops)})
    rng.shuffle(train)
    stats.update(preference_stats(train, val))
    stats["dropped"], stats["truncated"] = dict(stats["dropped"]), dict(stats["truncated"])
    stats["split"] = {"heldout": heldout, "train_hashes": sorted(trained)}
    return _store("preference", directory, key, train, val, stats, started, use_cache)


def _check_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _no_empty_masks(*splits: list[SFTExample]) -> None:
    for split in splits:
        for example in split:
            if not any(example.assistant_mask):  # examples.py never emits these; a last guard before training
                raise DataError(f"{example.source}: example with an empty loss mask")
