"""Conversations / preference pairs -> token ids with loss masks, inside length budgets.

Rendering is the template's job (`templates.render_chat`: history as context, the mask on the last assistant
reply and its end-of-turn token). This module decides *what* to render and what to cut:

- SFT: one example per assistant turn (with its history) or only the last one. When an example is over budget
  its context loses whole turns, oldest first, by the rule chat and serving use too (`gpt2chat.context_fit`:
  system messages and the last user turn are never dropped); the reply is kept whole. A last
  user turn that alone is still too long has its text cut at a token boundary as `Budgets.prompt_truncation`
  says (keep its end, its start, or drop the example). An example whose reply cannot fit is dropped.
- Preferences: the prompt is cut the same way to `max_prompt_length` (the last user turn by
  `prompt_truncation` too); replies are cut to `max_response_length` and to what `max_length` leaves (as
  seed 002 and TRL do). A reply that was not cut ends with the end-of-turn token.
- Every drop is counted by reason, every cut by what was cut.
- Never an example with an empty loss mask.

Speed: a dry render learns every text segment the template will encode; the distinct ones are encoded in one
`encode_batch` call (parallel in `tokenizers`) and the template reads them from that table, so history shared
by several per-turn examples, and contexts re-rendered to fit a budget, are encoded once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from gpt2chat.context_fit import candidates
from gpt2chat.data.types import (
    Budgets,
    Conversation,
    DataError,
    PreferenceExample,
    PreferencePair,
    SFTExample,
)


class PrefetchedTokenizer:
    """A tokenizer whose `encode_with_offsets` (what templates call) answers from a table.

    `prefetch(renders)` renders everything once with a recording stand-in (no BPE work) to learn the text
    segments the template will encode, then encodes the distinct ones in one `encode_batch` call (parallel in
    `tokenizers`) and derives each token's character offsets from its bytes. Segments met later (a context cut
    to fit a budget) are encoded on demand and remembered, so shared history is encoded once. Same ids and
    offsets as the wrapped tokenizer (pinned by a test); everything else is the wrapped tokenizer's.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.special_token_ids = tokenizer.special_token_ids  # a property that builds a set on every call
        self._table: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        self._byte_lengths: np.ndarray | None = None

    def prefetch(self, template, renders: Iterable[tuple[list[dict], bool]]) -> None:
        """Learn and batch-encode the segments of `renders` ((messages, add_generation_prompt) pairs)."""
        recorder = _Recorder(self._tokenizer)
        for messages, add_generation_prompt in renders:
            _render(recorder, messages, template, add_generation_prompt)
        todo = [text for text in dict.fromkeys(recorder.texts) if text not in self._table]
        if todo:
            for text, ids in zip(todo, self._tokenizer.encode_batch(todo), strict=True):
                self._table[text] = (ids, self._offsets(text, ids))

    def _offsets(self, text: str, ids: list[int]) -> list[tuple[int, int]]:
        """Character (start, end) per token; a token holding part of a multi-byte character covers all of it."""
        if self._byte_lengths is None or len(self._byte_lengths) < len(self._tokenizer):
            self._byte_lengths = self._token_byte_lengths()
        if not ids:
            return []
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        char_of_byte = np.cumsum((raw & 0xC0) != 0x80) - 1
        ends = np.cumsum(self._byte_lengths[np.asarray(ids)])
        starts = ends - self._byte_lengths[np.asarray(ids)]
        if ends[-1] != raw.size:  # cannot happen for plain byte-level BPE; never guess
            return self._tokenizer.encode_with_offsets(text)[1]
        return list(zip(char_of_byte[starts].tolist(), (char_of_byte[ends - 1] + 1).tolist(), strict=True))

    def _token_byte_lengths(self) -> np.ndarray:
        """Bytes per token id. A byte-level BPE token's string has one character per byte; added (control)
        tokens are their UTF-8 spelling."""
        tokenizer = self._tokenizer
        special = tokenizer.special_token_ids
        return np.array([len(tokenizer.token_bytes(i)) if i in special or i >= 50257
                         else len(tokenizer.id_to_token(i)) for i in range(len(tokenizer))], dtype=np.int64)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        hit = self._table.get(text)
        if hit is None:
            hit = self._table[text] = tuple(self._tokenizer.encode_with_offsets(text))
        return list(hit[0]), list(hit[1])

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


class _Recorder:
    """Stands in for the tokenizer during a dry render: notes the texts, returns no tokens."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.texts: list[str] = []
        self.special_token_ids = tokenizer.special_token_ids

    def encode_with_offsets(self, text: str):
        self.texts.append(text)
        return [], []

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def unwrap(tokenizer):
    return tokenizer._tokenizer if isinstance(tokenizer, PrefetchedTokenizer) else tokenizer


def _pair_renders(pairs: list[PreferencePair]):
    for pair in pairs:
        yield pair.prompt, True
        for reply in (pair.chosen, pair.rejected):
            yield pair.prompt + [{"role": "assistant", "content": reply}], False


def _render(tokenizer, messages: list[dict], template, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    from gpt2chat.templates import render_chat

    ids, mask = render_chat(tokenizer, messages, template=template, add_generation_prompt=add_generation_prompt)
    return list(ids), list(mask)


def cut_last_user_turn(tokenizer, messages: list[dict], template, add_generation_prompt: bool, mode: str,
                       overflow) -> tuple[list[dict], list[int], list[int]] | None:
    """`messages` with the text of its last user turn cut at a token boundary, keeping its end ("keep_end")
    or its start ("keep_start"), until `overflow(ids, mask)` (tokens over budget) is <= 0 -> (messages, ids,
    mask); None when not even one token of that turn fits."""
    index = max(i for i, m in enumerate(messages) if m["role"] == "user")
    text = messages[index]["content"]
    _, offsets = tokenizer.encode_with_offsets(text)
    kept, candidate = len(offsets), messages
    ids, mask = _render(tokenizer, candidate, template, add_generation_prompt)
    excess = overflow(ids, mask)
    while excess > 0:
        kept -= excess  # each round removes the measured excess; a BPE merge at the new edge may need one more
        if kept < 1:
            return None
        cut = text[offsets[-kept][0]:] if mode == "keep_end" else text[: offsets[kept - 1][1]]
        candidate = [*messages[:index], {**messages[index], "content": cut}, *messages[index + 1:]]
        ids, mask = _render(tokenizer, candidate, template, add_generation_prompt)
        excess = overflow(ids, mask)
    return candidate, ids, mask


def sft_turn_targets(conversation: Conversation, per_turn: bool) -> list[list[dict]]:
    """The message lists to train on: one per assistant turn (each with its history), or the whole thing."""
    messages = conversation.messages
    if not per_turn:
        return [messages]
    return [messages[: index + 1] for index, m in enumerate(messages) if m["role"] == "assistant" and index > 0]


def _count_dropped_turns(truncations: Counter | None, dropped: int) -> None:
    """An example that kept its reply by losing its oldest turns (the context-fit rule) is counted as cut."""
    if dropped and truncations is not None:
        truncations["oldest turns dropped to fit"] += 1


def sft_example(tokenizer, messages: list[dict], template, budgets: Budgets, source: str,
                truncations: Counter | None = None) -> tuple[SFTExample | None, str | None]:
    """Render one target (ends with the reply to train on) inside the budgets -> (example, None) or (None, reason)."""
    first = True
    candidate = messages
    for candidate, dropped in candidates(messages):
        ids, mask = _render(tokenizer, candidate, template, False)
        if first:
            first = False
            reply_tokens = sum(mask)
            if reply_tokens == 0:
                return None, "empty loss mask"
            if budgets.max_response_length is not None and reply_tokens > budgets.max_response_length:
                return None, "reply over max_response_length"
        prompt_tokens = mask.index(1)
        if len(ids) <= budgets.max_length and (budgets.max_prompt_length is None
                                               or prompt_tokens <= budgets.max_prompt_length):
            if sum(mask) == 0:
                return None, "empty loss mask"
            _count_dropped_turns(truncations, dropped)
            return SFTExample(input_ids=ids, assistant_mask=mask, source=source), None
    if sum(mask) + 1 > budgets.max_length:
        return None, "reply over max_length"
    if budgets.prompt_truncation != "drop":

        def overflow(ids: list[int], mask: list[int]) -> int:
            over = len(ids) - budgets.max_length
            if budgets.max_prompt_length is not None:
                over = max(over, mask.index(1) - budgets.max_prompt_length)
            return over

        cut = cut_last_user_turn(tokenizer, candidate, template, False, budgets.prompt_truncation, overflow)
        if cut is not None and sum(cut[2]) > 0:
            if truncations is not None:
                truncations[f"last user turn cut to the budget ({budgets.prompt_truncation})"] += 1
            _count_dropped_turns(truncations, dropped)
            return SFTExample(input_ids=cut[1], assistant_mask=cut[2], source=source), None
    return None, "last user turn over budget"


def build_sft(tokenizer, conversations: list[Conversation], template, budgets: Budgets,
              per_turn: bool = True, drops: Counter | None = None,
              targets: list[tuple[list[dict], str]] | None = None,
              truncations: Counter | None = None) -> list[SFTExample]:
    """Examples for many conversations (or ready-made (messages, source) targets); drops and cuts counted."""
    drops = drops if drops is not None else Counter()
    if targets is None:
        targets = [(t, c.source) for c in conversations for t in sft_turn_targets(c, per_turn)]
    fast = tokenizer if isinstance(tokenizer, PrefetchedTokenizer) else PrefetchedTokenizer(tokenizer)
    fast.prefetch(template, ((messages, False) for messages, _ in targets))
    examples = []
    for messages, source in targets:
        example, reason = sft_example(fast, messages, template, budgets, source, truncations)
        if example is None:
            drops[reason] += 1
        else:
            examples.append(example)
    return examples


def preference_example(tokenizer, pair: PreferencePair, template, budgets: Budgets,
                       truncations: Counter | None = None) -> tuple[PreferenceExample | None, str | None]:
    """One pair inside the budgets -> (example, None) or (None, reason)."""
    prompt_ids = prompt = None
    for candidate, dropped in candidates(pair.prompt):
        ids, _ = _render(tokenizer, candidate, template, True)
        if budgets.max_prompt_length is None or len(ids) <= budgets.max_prompt_length:
            prompt_ids, prompt = ids, candidate
            _count_dropped_turns(truncations, dropped)
            break
    if prompt_ids is None and budgets.prompt_truncation != "drop":
        cut = cut_last_user_turn(tokenizer, candidate, template, True, budgets.prompt_truncation,
                                 lambda ids, _: len(ids) - budgets.max_prompt_length)
        if cut is not None:
            prompt, prompt_ids, _ = cut
            if truncations is not None:
                truncations[f"last user turn cut to the budget ({budgets.prompt_truncation})"] += 1
            _count_dropped_turns(truncations, dropped)
    if prompt_ids is None:
        return None, "last user turn over max_prompt_length"
    room = budgets.max_length - len(prompt_ids)
    if budgets.max_response_length is not None:
        room = min(room, budgets.max_response_length)
    if room < 1:
        return None, "no room for the reply"
    replies = []
    for name, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids, mask = _render(tokenizer, prompt + [{"role": "assistant", "content": text}], template, False)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(f"template {getattr(template, 'name', template)!r}: rendering with the reply does not "
                            f"start with the rendered prompt ({pair.source})")
        reply = ids[len(prompt_ids):]
        if not reply or sum(mask[len(prompt_ids):]) == 0:
            return None, "empty loss mask"
        if len(reply) > room:
            reply = reply[:room]
            if truncations is not None:
                truncations[f"{name} reply cut"] += 1
        replies.append(reply)
    return PreferenceExample(prompt_ids=prompt_ids, chosen_ids=replies[0], rejected_ids=replies[1],
                             source=pair.source), None


def build_preferences(tokenizer, pairs: list[PreferencePair], template, budgets: Budgets,
                      drops: Counter | None = None, truncations: Counter | None = None) -> list[PreferenceExample]:
    drops = drops if drops is not None else Counter()
    fast = tokenizer if isinstance(tokenizer, PrefetchedTokenizer) else PrefetchedTokenizer(tokenizer)
    fast.prefetch(template, _pair_renders(pairs))
    examples = []
    for pair in pairs:
        example, reason = preference_example(fast, pair, template, budgets, truncations)
        if example is None:
            drops[reason] += 1
        else:
            examples.append(example)
    return examples
