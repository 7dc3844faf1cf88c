"""Grammar engines for JSON Schema constrained decoding, measured on GPT-2's vocabulary: llguidance, xgrammar,
outlines-core (whichever import), in one process, interleaved.

The vocabulary is the real GPT-2 BPE (50,257 tokens) plus the special tokens every chat template adds, padded
to the model's embedding width. For each engine and each schema of a suite (flat, nested with $ref, enum,
anyOf / nullable, pattern, recursive, any object) we measure:

* compile: the time from a schema to a ready matcher (tokenizer tables built once beforehand, not counted;
  caches off where the engine has one, since each request brings its own schema);
* mask: the time to compute one step's allowed-token mask, per token, median over every step of every walk;
* correctness: `--walks` seeded walks per schema, each step drawing a token from random logits restricted to
  the mask (what a random-weights model does), until a stop token or `--max-tokens`. Every walk that ends by
  the stop token must parse as JSON and validate against the schema (`jsonschema`); a walk where the mask
  allows nothing, or an engine that rejects a schema, is counted.

    python -m benchmarks.grammar_engines --rounds 3 --walks 10

xgrammar and outlines-core are not dependencies: install them beside it to compare (they are skipped when
absent; the table in benchmarks/README.md had xgrammar 0.2.9 and outlines-core 0.2.14 installed with --no-deps).

Prints one JSON line per engine and schema, then a markdown table (medians over rounds and steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMAS: dict[str, dict] = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "member": {"type": "boolean"},
        },
        "required": ["name", "age", "member"],
        "additionalProperties": False,
    },
    "nested_ref": {
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "order": {"type": "integer", "minimum": 0, "maximum": 99999},
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1, "maxItems": 3},
            "status": {"enum": ["open", "paid", "shipped"]},
        },
        "required": ["order", "items", "status"],
        "additionalProperties": False,
    },
    "anyof_nullable": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "string", "maxLength": 6}]},
            "note": {"type": ["string", "null"], "maxLength": 6},
        },
        "required": ["value", "note"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["code", "score"],
        "additionalProperties": False,
    },
    "recursive": {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 4},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 2},
                },
                "required": ["label", "children"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/Node",
    },
    "any_object": {"type": "object"},
}

# one JSON Schema feature each: can the engine compile it, and do its outputs validate?
FEATURES: dict[str, dict] = {
    "const": {"type": "object", "properties": {"v": {"const": "x"}}, "required": ["v"]},
    "oneOf": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "null"}}, "required": ["b"]}]},
    "format_date": {"type": "string", "format": "date"},
    "format_date_time": {"type": "string", "format": "date-time"},
    "format_uuid": {"type": "string", "format": "uuid"},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 3},
                                                     {"type": "boolean"}], "items": False},
    "minItems_maxItems": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    "uniqueItems": {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "maxItems": 3},
    "minLength": {"type": "string", "minLength": 3, "maxLength": 5},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "multipleOf": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    "minProperties": {"type": "object", "additionalProperties": {"type": "boolean"}, "minProperties": 1,
                      "maxProperties": 2},
    "patternProperties": {"type": "object", "patternProperties": {"^x[0-9]$": {"type": "boolean"}},
                          "additionalProperties": False, "maxProperties": 2},
    "additionalProperties_schema": {"type": "object", "properties": {"a": {"type": "boolean"}},
                                    "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
                                    "maxProperties": 2},
    "not": {"type": "integer", "not": {"const": 3}, "minimum": 0, "maximum": 5},
    "if_then": {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
                "if": {"properties": {"a": {"const": True}}}, "then": {"required": ["b"]}},
    "dependentRequired": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}},
                          "dependentRequired": {"a": ["b"]}},
    "pattern_lookahead": {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{3}$"},
}

# schemas no engine should accept: a request bringing one must get an error naming what is wrong
BAD_SCHEMAS: dict[str, dict] = {
    "unknown_type": {"type": "strin"},
    "dangling_ref": {"$ref": "#/$defs/Missing"},
    "bad_pattern": {"type": "string", "pattern": "([a-z"},
    "min_over_max": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1},
}


def gpt2_vocab():
    """(tokenizer, token bytes per id, special ids, stop id, embedding width) for GPT-2 + every template."""
    from gpt2chat.templates import TEMPLATES
    from gpt2chat.tokenizer import Tokenizer

    tok = Tokenizer.gpt2()
    for template in TEMPLATES.values():
        template.ensure_tokens(tok)
    width = (len(tok) + 63) // 64 * 64  # the model's embedding rows: padded past the tokenizer's length
    specials = sorted(tok.special_token_ids)
    stop = tok.token_to_id("<|eot_id|>")
    return tok, [tok.token_bytes(i) for i in range(len(tok))], specials, stop, width


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, tokens, specials, stop, width):
        import llguidance
        import llguidance.torch  # noqa: F401

        self.ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=width, eos_token=stop)
        self.width = width
        self.version = llguidance.__version__

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
        matcher = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def fill(self, matcher, bitmask):
        self.ll.torch.fill_next_token_bitmask(matcher, bitmask, 0)

    def accept(self, matcher, token):
        return matcher.consume_token(token)

    def done(self, matcher):
        return matcher.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, tokens, specials, stop, width):
        import xgrammar

        self.xgr = xgrammar
        # special tokens other than the stop token must never be text: an empty entry is what xgrammar skips
        vocab = [b"" if i in specials else t for i, t in enumerate(tokens)]
        self.info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=width, stop_token_ids=[stop])
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.version = getattr(xgrammar, "__version__", "?")

    def compile(self, schema):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask):
        matcher.fill_next_token_bitmask(bitmask, 0)

    def accept(self, matcher, token):
        return matcher.accept_token(token)

    def done(self, matcher):
        return matcher.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, tokens, specials, stop, width):
        import outlines_core

        self.oc = outlines_core
        table: dict[bytes, list[int]] = {}
        for i, t in enumerate(tokens):
            if i not in specials:
                table.setdefault(t, []).append(i)
        self.vocab = outlines_core.Vocabulary(stop, table)
        self.version = "0.2.14"

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def fill(self, matcher, bitmask):
        row = bitmask[0]
        matcher.write_mask_into(row.data_ptr(), row.numel(), 4)

    def accept(self, matcher, token):
        matcher.advance(token, return_tokens=False)
        return True

    def done(self, matcher):
        return matcher.is_finished()


def unpack(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """int32 words [1, ceil(V/32)] -> bool [V] (bit j of word w is token 32 w + j)."""
    bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:width].bool()


def walk(engine, schema, stop, width, generator, max_tokens, tok, specials):
    """One seeded random walk; returns (outcome, mask seconds per step, token count)."""
    matcher = engine.compile(schema)
    others = torch.tensor([i for i in specials if i != stop] + list(range(len(tok), width)))
    bitmask = torch.zeros(1, (width + 31) // 32, dtype=torch.int32)
    times, out = [], []
    for _ in range(max_tokens):
        t0 = time.perf_counter()
        engine.fill(matcher, bitmask)
        times.append(time.perf_counter() - t0)
        allowed = unpack(bitmask, width)
        if not allowed.any():
            return "empty mask", times, len(out)
        if allowed[others].any():
            return "a control token or padding id allowed", times, len(out)
        logits = torch.randn(width, generator=generator) * 3
        token = int(logits.masked_fill(~allowed, -float("inf")).argmax())
        if token == stop:
            break
        if not engine.accept(matcher, token):
            return "token rejected", times, len(out)
        out.append(token)
    else:
        return "cut", times, len(out)
    import jsonschema

    text = tok.decode(out)
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as exc:
        return f"invalid: {type(exc).__name__} {text[:60]!r}", times, len(out)
    return "ok", times, len(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--walks", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok, tokens, specials, stop, width = gpt2_vocab()
    engines, setup = [], {}
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        t0 = time.perf_counter()
        try:
            engines.append(cls(tok, tokens, specials, stop, width))
        except ImportError as exc:
            print(json.dumps({"engine": cls.name, "skipped": str(exc)}))
            continue
        setup[cls.name] = time.perf_counter() - t0
    features = {}
    for engine in engines:
        for fname, schema in FEATURES.items():
            try:
                engine.compile(schema)
            except Exception as exc:
                features[(engine.name, fname)] = "compile error: " + str(exc).splitlines()[0][:70]
                continue
            outcomes: dict[str, int] = {}
            for w in range(args.walks):
                generator = torch.Generator().manual_seed(args.seed * 1000 + w)
                outcome = walk(engine, schema, stop, width, generator, args.max_tokens, tok, specials)[0]
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            features[(engine.name, fname)] = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
        for bname, schema in BAD_SCHEMAS.items():
            try:
                engine.compile(schema)
                features[(engine.name, "bad:" + bname)] = "ACCEPTED"
            except Exception as exc:
                features[(engine.name, "bad:" + bname)] = "rejected: " + str(exc).replace("\n", " ")[:90]
    for (ename, fname), verdict in features.items():
        print(json.dumps({"engine": ename, "feature": fname, "verdict": verdict}))
    stats: dict[tuple[str, str], dict] = {}
    for rnd in range(args.rounds):
        order = engines[rnd % len(engines):] + engines[: rnd % len(engines)]
        for engine in order:
            for sname, schema in SCHEMAS.items():
                s = stats.setdefault((engine.name, sname), {"compile": [], "mask": [], "outcomes": {}})
                t0 = time.perf_counter()
                try:
                    engine.compile(schema)
                except Exception as exc:  # an engine that cannot take the schema
                    s["outcomes"]["compile error: " + str(exc).splitlines()[0][:60]] = 1
                    continue
                s["compile"].append(time.perf_counter() - t0)
                for w in range(args.walks):
                    generator = torch.Generator().manual_seed(args.seed * 1000 + rnd * 100 + w)
                    outcome, times, _ = walk(engine, schema, stop, width, generator, args.max_tokens, tok, specials)
                    s["mask"] += times
                    s["outcomes"][outcome] = s["outcomes"].get(outcome, 0) + 1
    rows = []
    for engine in engines:
        for sname in SCHEMAS:
            s = stats[(engine.name, sname)]
            line = {
                "engine": engine.name, "version": engine.version, "schema": sname,
                "setup_s": round(setup[engine.name], 3),
                "compile_ms": round(statistics.median(s["compile"]) * 1e3, 2) if s["compile"] else None,
                "mask_us": round(statistics.median(s["mask"]) * 1e6, 1) if s["mask"] else None,
                "mask_p99_us": round(sorted(s["mask"])[int(0.99 * (len(s["mask"]) - 1))] * 1e6, 1) if s["mask"] else None,
                "outcomes": s["outcomes"],
            }
            print(json.dumps(line))
            rows.append(line)
    print("\n| engine | schema | compile ms | mask us/token (median / p99) | walks: outcome |")
    print("|---|---|---|---|---|")
    for r in rows:
        outcomes = ", ".join(f"{k}: {v}" for k, v in r["outcomes"].items())
        print(f"| {r['engine']} {r['version']} | {r['schema']} | {r['compile_ms']} | {r['mask_us']} / {r['mask_p99_us']} | {outcomes} |")
    names = [e.name for e in engines]
    print("\n| feature | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for fname in [*FEATURES, *("bad:" + b for b in BAD_SCHEMAS)]:
        print(f"| {fname} | " + " | ".join(features[(n, fname)] for n in names) + " |")


if __name__ == "__main__":
    main()
