"""Small builders of data rows the data tests share (a plain module: no test imports another test module)."""

from __future__ import annotations

import json

from gpt2chat.data import Conversation, PreferencePair


def tokenizer_with_every_template():
    """GPT-2's tokenizer with the control tokens of every chat template."""
    from gpt2chat.templates import TEMPLATES
    from gpt2chat.tokenizer import Tokenizer

    tokenizer = Tokenizer.gpt2()
    for template in TEMPLATES.values():
        template.ensure_tokens(tokenizer)
    return tokenizer


def conv(*texts, system=None, source="t:1"):
    """A conversation of alternating user / assistant `texts`, after an optional system message."""
    messages = [{"role": "system", "content": system}] if system else []
    for index, text in enumerate(texts):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return Conversation(messages=messages, source=source)


def pair(prompt, chosen="Yes.", rejected="No.", system=None):
    """A preference pair whose prompt alternates user / assistant turns."""
    turns = [{"role": "system", "content": system}] if system else []
    for index, text in enumerate(prompt):
        turns.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return PreferencePair(prompt=turns, chosen=chosen, rejected=rejected, source="p:1")


def trained_text(tok, example):
    """The text of an SFT example's loss-masked tokens."""
    return tok.decode([i for i, m in zip(example.input_ids, example.assistant_mask, strict=True) if m])


def msg(mid, parent, role, text, rank=None, tree="t1", **extra):
    """One OASST message row."""
    row = {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": "en",
           "deleted": False, "review_result": True, "message_tree_id": tree}
    row.update(extra)
    return row


def write(tmp_path, rows, name="oasst.jsonl"):
    """OASST rows as a JSON-lines file -> its `oasst1:` spec."""
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f"oasst1:{path}"


def texts(conversation):
    return [m["content"] for m in conversation.messages]
