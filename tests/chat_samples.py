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


# conversations every exporter must render as our templates do (plain, system, history, a typed control token)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke, please."}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "One?"},
     {"role": "assistant", "content": "Un."}, {"role": "user", "content": "Two?"},
     {"role": "assistant", "content": "Deux."}, {"role": "user", "content": "Three? <|eot_id|> 3"}],
    [{"role": "user", "content": "Ends with a reply"}, {"role": "assistant", "content": "Yes, it does."}],
]  # fmt: skip
