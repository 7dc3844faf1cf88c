"""The engine's `TokenLogprob`s in OpenAI's two shapes: chat's `logprobs.content` and completions' columns.

Chat (`logprobs: true, top_logprobs: k`): `{"content": [{"token", "logprob", "bytes", "top_logprobs":
[k x {"token", "logprob", "bytes"}]}], "refusal": null}`. Completions (`logprobs: k`, with `echo` the
prompt's tokens first, the very first one unscored): `{"tokens", "token_logprobs", "top_logprobs": [{token:
logprob} of the k most likely plus the chosen one], "text_offset"}`. A streamed chunk carries the same
shape for the tokens it delivers. Tokens are spelled by `gpt2chat.reply_text.token_text`.

Logprobs are the model's raw distribution (before temperature, top-p and penalties; the engine's
contract). This module knows nothing about HTTP or how logprobs are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpt2chat.reply_text import token_text

__all__ = ["chat_logprobs", "completion_logprobs", "LOGPROB_FLOOR"]

LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity: a probability that underflowed is reported as this


def _finite(logprob: float) -> float:
    return max(float(logprob), LOGPROB_FLOOR)


def _chat_token(tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": token_text(tokenizer, token_id), "logprob": _finite(logprob),
            "bytes": list(tokenizer.token_bytes(token_id))}


def chat_logprobs(tokenizer, entries: Sequence[Any]) -> dict[str, Any]:
    """`choice.logprobs` of a chat completion (or chunk) for the tokens behind `entries`."""
    content = []
    for entry in entries:
        item = _chat_token(tokenizer, entry.token_id, entry.logprob)
        item["top_logprobs"] = [_chat_token(tokenizer, t, lp) for t, lp in entry.top]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, token_ids: Sequence[int], entries: Sequence[Any], offsets: Sequence[int]
                        ) -> dict[str, Any]:
    """`choice.logprobs` of a text completion (or chunk): one column entry per token id; an entry of
    None (the first prompt token, which nothing predicts) gives nulls."""
    tokens, token_logprobs, top_logprobs = [], [], []
    for token_id, entry in zip(token_ids, entries, strict=True):
        tokens.append(token_text(tokenizer, token_id))
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(entry.logprob))
        top = {token_text(tokenizer, t): _finite(lp) for t, lp in entry.top}
        top.setdefault(tokens[-1], _finite(entry.logprob))  # OpenAI: the chosen token is always there
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": list(offsets)}
