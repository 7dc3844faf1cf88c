"""Constrained decoding: a grammar (JSON Schema, any JSON object, Lark) -> per-step masks of allowed tokens.

Built on llguidance (chosen by measurement over xgrammar and outlines-core; see docs/DESIGN.md and
benchmarks/grammar_engines.py). Two objects:

* `Constraint`: a compiled description, immutable and shareable. It holds the grammar and the vocabulary
  tables of one tokenizer at one embedding width; building it checks the grammar, so a schema the engine
  cannot follow raises `GrammarError` naming what is wrong before any request is queued.
* `ConstraintState`: one generation's position in the grammar, made by `Constraint.start()` for each
  request row. `fill(bitmask_row)` writes the allowed tokens of the next step (one bit per token id), and
  `advance(token)` moves on with the token the sampler drew.

`grammar_masks(states, ...)` turns the states of several rows into one bool `[rows, vocab]` tensor.

The end of the grammar is where stop tokens become allowed: while the grammar is incomplete no stop token
may be drawn, and once it is complete (`accepting`) the row's stop tokens are allowed (and, when nothing
more can follow, they are all that is). The text side never sees any of this: it gets token ids as usual.

This module knows nothing about models, HTTP or chat templates; sampling.py applies the masks.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from gpt2chat.errors import Gpt2ChatError

if TYPE_CHECKING:
    import torch

    from gpt2chat.tokenizer import Tokenizer

__all__ = ["Constraint", "ConstraintState", "GrammarError", "JSON_SEPARATORS", "grammar_masks"]

# JSON as `json.dumps` writes it (", " and ": ", no other whitespace): the layout GPT-2 saw most in its text,
# one fixed spelling per value, and no way to spend a reply on whitespace
JSON_SEPARATORS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(Gpt2ChatError):
    """A schema or grammar the engine cannot compile; the message says what is wrong."""


_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def _ll():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise Gpt2ChatError("constrained decoding needs the 'llguidance' package (pip install llguidance)") from exc
    return llguidance


def _vocabulary(tokenizer: Tokenizer, width: int):
    """llguidance's tables for `tokenizer` at `width` ids (built once, ~1 s at GPT-2's 50k, then cached).

    Ids from len(tokenizer) to width (embedding padding) are never allowed; special tokens are never text."""
    ll = _ll()
    key = (len(tokenizer), width)
    with _tables_lock:
        per_tokenizer = _tables.setdefault(tokenizer, {})
        table = per_tokenizer.get(key)
        if table is None:
            table = ll.LLTokenizer(tokenizer.backend.to_str(), n_vocab=width, eos_token=tokenizer.eos_token_id)
            per_tokenizer[key] = table
    return table


class Constraint:
    """A compiled grammar over one tokenizer's vocabulary (see the module docstring). Immutable."""

    __slots__ = ("grammar", "width", "description", "_vocab")

    def __init__(self, grammar: str, tokenizer: Tokenizer, width: int, description: str = "grammar"):
        ll = _ll()
        self.grammar = grammar
        self.width = int(width)
        self.description = description
        self._vocab = _vocabulary(tokenizer, self.width)
        is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, self._vocab)
        if is_error:
            raise GrammarError(f"{description}: {_first_line(messages[0] if messages else 'invalid grammar')}")

    # ------------------------------------------------------------------ builders
    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool, tokenizer: Tokenizer, width: int,
                    *, what: str = "json_schema") -> Constraint:
        """Output is one JSON value matching `schema`, written with `JSON_SEPARATORS`."""
        if not isinstance(schema, Mapping | bool):
            raise GrammarError(f"{what}: a JSON Schema is an object (or true / false), got {type(schema).__name__}")
        try:
            grammar = _ll().LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_SEPARATORS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"{what}: {_first_line(str(exc))}") from None
        return cls(grammar, tokenizer, width, what)

    @classmethod
    def json_object(cls, tokenizer: Tokenizer, width: int) -> Constraint:
        """Output is one JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls.json_schema({"type": "object"}, tokenizer, width, what="json_object")

    @classmethod
    def tool_calls(cls, tools: list[Mapping[str, Any]], tokenizer: Tokenizer, width: int, *, free_text: bool,
                   parallel: bool, what: str = "tools") -> Constraint:
        """Output is `tool_calls`' text format: one `<tool_call>` block (several, newline-separated, when
        `parallel`) whose arguments match the function's `parameters`; with `free_text` the reply may
        instead be any text without `<tool_call>`, or text then the blocks (OpenAI's tool_choice "auto").
        `tools`: OpenAI's function tools, already checked (names, parameter schemas that are objects)."""
        from gpt2chat.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

        bodies = []
        for k, tool in enumerate(tools):
            function = tool["function"]
            params = dict(function.get("parameters") or {})
            params.setdefault("type", "object")
            params["x-guidance"] = {**params.get("x-guidance", {}), **JSON_SEPARATORS}
            # alone first, so that an error names the function
            cls.json_schema(params, tokenizer, width, what=f"{what}[{k}].function.parameters")
            head = json.dumps({"name": function["name"]}, ensure_ascii=False)[:-1] + ', "arguments": '
            bodies.append(f"call_{k}: {json.dumps(head)} %json {json.dumps(params)} "
                          f"{json.dumps('}' + TOOL_CALL_CLOSE)}")
        more = f' ("\\n" {json.dumps(TOOL_CALL_OPEN)} call)*' if parallel else ""
        lines = ["%llguidance {}"]
        if free_text:
            # TEXT never holds the open tag; `head` (lazy) is text up to the first one: without `head`'s
            # laziness the lexer would read the tag into TEXT and never see a call start
            lines += [f"start: TEXT | head call{more}",
                      f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{TOOL_CALL_OPEN}(.|\\n)*/",
                      f"head[lazy]: /(.|\\n)*/ {json.dumps(TOOL_CALL_OPEN)}"]
        else:
            lines.append(f"start: {json.dumps(TOOL_CALL_OPEN)} call{more}")
        lines.append("call: " + " | ".join(f"call_{k}" for k in range(len(tools))))
        return cls.lark("\n".join(lines + bodies), tokenizer, width, what=what)

    @classmethod
    def lark(cls, grammar: str, tokenizer: Tokenizer, width: int, *, what: str = "grammar") -> Constraint:
        """Output matches a Lark grammar in llguidance's dialect (`%json {...}` inlines a JSON Schema)."""
        try:
            compiled = _ll().LLMatcher.grammar_from_lark(grammar)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"{what}: {_first_line(str(exc))}") from None
        return cls(compiled, tokenizer, width, what)

    def start(self) -> ConstraintState:
        """A fresh state at the start of the grammar, for one generation."""
        return ConstraintState(self)

    def __repr__(self) -> str:
        return f"Constraint({self.description}, width={self.width})"


class ConstraintState:
    """Where one generation stands in its grammar; not shared between requests."""

    __slots__ = ("constraint", "matcher", "tokens")

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.matcher = _ll().LLMatcher(constraint._vocab, constraint.grammar, log_level=0)
        self.tokens = 0

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match: the row may stop here."""
        return self.matcher.is_accepting()

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    def fill(self, words: torch.Tensor, stop_token_ids: Iterable[int]) -> None:
        """Write the next step's allowed tokens into `words` (int32, CPU, contiguous, ceil(width / 32)
        words; bit j of word w is token 32 w + j). Stop tokens are allowed exactly when the grammar is
        complete; llguidance's own end-of-text bit is replaced by the row's `stop_token_ids`."""
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        eos = self.constraint._vocab.eos_token
        words[eos // 32] &= ~_bit(eos % 32)
        if self.matcher.is_accepting() or self.matcher.is_error():
            # complete: the row may end; in error (should not happen): let it end instead of stalling.
            # A row without stop tokens ends on end-of-text.
            for token in tuple(stop_token_ids) or (eos,):
                if 0 <= token < self.constraint.width:
                    words[token // 32] |= _bit(token % 32)

    def advance(self, token: int) -> None:
        """Consume the token the sampler drew (a token the mask allowed)."""
        self.tokens += 1
        self.matcher.consume_token(int(token))


_BIT_SHIFTS: dict = {}


def grammar_masks(states: list[ConstraintState], stops: list[tuple[int, ...]], vocab: int, device) -> torch.Tensor:
    """Allowed-token masks bool [len(states), vocab] on `device` for the next step of each state.

    The grammar engine writes one bit per token on the host (int32 words); the words travel to the device
    (vocab / 8 bytes per row) and are unpacked there."""
    import torch

    n_words = (max(vocab, *(s.constraint.width for s in states)) + 31) // 32
    words = torch.zeros(len(states), n_words, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
    for k, (state, stop) in enumerate(zip(states, stops, strict=True)):
        state.fill(words[k], stop)
    words = words.to(device, non_blocking=True)
    shifts = _BIT_SHIFTS.get(words.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[words.device] = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(len(states), -1)[:, :vocab].bool()


def _bit(j: int) -> int:
    """1 << j as an int32 value (bit 31 is negative)."""
    return (1 << j) - (1 << 32) if j == 31 else 1 << j


def _first_line(text: str) -> str:
    text = text.strip()
    for prefix in ("WARNING: ",):
        text = text.removeprefix(prefix)
    return " ".join(text.split("\n")[:3]).strip()[:400]
