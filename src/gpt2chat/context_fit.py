"""The one rule for fitting a conversation into a context, used by training, evaluation and serving.

A conversation that is too long loses whole turns, oldest first:

* a *turn* is a user message and the messages after it up to the next user message (messages before the
  first user message, e.g. an assistant greeting, are a turn of their own);
* system messages are never dropped, wherever they stand;
* the *tail* is never dropped: the last user message and everything after it (the reply a training
  example is trained on, or nothing when the conversation ends on the user's turn);
* tokens are never cut off the front of a rendering (that would cut a control token or the system
  message): every candidate is the template's whole rendering of the messages kept.

`candidates(messages)` yields the conversation with 0, 1, 2, ... oldest turns dropped; each user of the rule
picks the first candidate that fits its budget: the SFT / preference example builders
(`gpt2chat.data.examples`, then cutting the last user turn's text when asked), and `fit_messages` for chat,
the HTTP server and the report card's replies (it keeps `reserve` tokens free for the reply and raises
`PromptTooLongError` when nothing fits). `FittedPrompt.dropped_turns` says how many turns went, so that a
front end can say so.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from gpt2chat.errors import Gpt2ChatError

__all__ = ["FittedPrompt", "PromptTooLongError", "candidates", "fit_messages", "prompt_too_long", "reply_reserve"]


class PromptTooLongError(Gpt2ChatError):
    """The prompt leaves no room for a reply in the model's context (HTTP 400, OpenAI's code)."""

    code = "context_length_exceeded"
    param = "messages"


def _tail_start(messages: Sequence[dict]) -> int:
    """Index of the last user message (the tail never dropped); the last message when there is none."""
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"),
                max(0, len(messages) - 1))


def _oldest_turn(messages: Sequence[dict]) -> list[int] | None:
    """Indices of the oldest droppable turn (its system messages excluded); None when nothing can go."""
    tail = _tail_start(messages)
    start = next((i for i in range(tail) if messages[i].get("role") != "system"), None)
    if start is None:
        return None
    end = start + 1
    while end < tail and messages[end].get("role") != "user":
        end += 1
    return [i for i in range(start, end) if messages[i].get("role") != "system"]


def candidates(messages: Sequence[dict]) -> Iterator[tuple[list[dict], int]]:
    """(messages, turns dropped): the conversation itself, then with its oldest turns dropped one at a
    time, until only the system messages and the tail are left."""
    kept = [dict(m) for m in messages]
    dropped = 0
    while True:
        yield kept, dropped
        turn = _oldest_turn(kept)
        if turn is None:
            return
        gone = set(turn)
        kept = [m for i, m in enumerate(kept) if i not in gone]
        dropped += 1


def reply_reserve(context: int, max_new_tokens: int) -> int:
    """Tokens of the context kept free for the reply when old turns must go: the reply's budget, but at
    most a quarter of the context (a long budget must not push the whole history out)."""
    return max(1, min(max_new_tokens, context // 4, context - 1))


@dataclass(frozen=True)
class FittedPrompt:
    ids: list[int]  # the rendered prompt, ending with the template's generation prompt
    messages: list[dict]  # the messages it was rendered from (the input less the dropped turns)
    dropped_turns: int  # how many turns (a user message and the replies after it) were dropped

    def notice(self) -> str:
        """One line for a front end to show, or "" when nothing was dropped."""
        if not self.dropped_turns:
            return ""
        turns = "turn" if self.dropped_turns == 1 else "turns"
        return f"({self.dropped_turns} oldest {turns} dropped to fit the model's context)"


def fit_messages(tokenizer, template, messages: Sequence[dict], *, context: int, reserve: int = 1,
                 truncate: bool = True, hint: str = "") -> FittedPrompt:
    """Render `messages` with the generation prompt (`template`: a `ChatTemplate`) so that at least one
    token (`reserve` when it can drop turns) is left for the reply, by the rule of the module docstring.
    `truncate=False` never drops anything. `hint` is added to the error message (how the caller can ask
    for truncation)."""
    ids: list[int] = []
    kept: list[dict] = []
    dropped = 0
    for candidate in candidates(messages):
        kept, dropped = candidate
        ids, _ = template.render(tokenizer, kept, add_generation_prompt=True)
        if not truncate or len(ids) <= context - reserve:
            break
    if len(ids) >= context:
        cut = f" after dropping the {dropped} oldest turn{'s' if dropped != 1 else ''}" if dropped else ""
        raise prompt_too_long(len(ids), context, f"the messages{hint}", cut)
    return FittedPrompt(list(ids), kept, dropped)


def prompt_too_long(length: int, context: int, what: str, cut: str = "") -> PromptTooLongError:
    """The error for a prompt of `length` tokens that leaves no room for a reply in `context` (`what`: what
    the user should shorten; `cut`: what was already dropped)."""
    return PromptTooLongError(
        f"the prompt is too long: {length} tokens{cut}, but the model's context is {context} tokens "
        f"and at least one must be left for the reply: shorten {what}"
    )
