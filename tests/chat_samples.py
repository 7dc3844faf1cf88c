"""Conversations the tests of the context rule and its users share (a plain module: no test imports another
test module)."""

from __future__ import annotations


def conversation(turns: int, words: int = 12) -> list[dict]:
    """A system message, `turns` question/answer turns of about `words` words each, then a last question."""
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(turns):
        messages += [{"role": "user", "content": f"question {turn} " + "word " * words},
                     {"role": "assistant", "content": f"answer {turn} " + "word " * words}]
    return messages + [{"role": "user", "content": "last question"}]
