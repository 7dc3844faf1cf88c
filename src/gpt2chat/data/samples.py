"""The quickstart data shipped in `gpt2chat/resources`, generated deterministically (run this module to rewrite).

`quickstart_sft.jsonl` (messages format): a few hundred short conversations simple enough for a tiny model to
learn visible structure in minutes: greetings, one-step arithmetic, capitals, opposites, counting, who-are-you,
two- and three-turn follow-ups, a system message in some. `quickstart_pref.jsonl` (UltraFeedback layout:
chosen / rejected message lists sharing the user turn): the right, polite answer against a wrong or rude one.

    python -m gpt2chat.data.samples [OUT_DIR]      # default: the package's resources folder
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 1234
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Russia": "Moscow", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Ireland": "Dublin", "Austria": "Vienna", "Turkey": "Ankara",
    "Australia": "Canberra", "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul",
}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "happy": "sad",
             "open": "closed", "light": "dark", "old": "young", "early": "late", "full": "empty", "wet": "dry"}
GREETINGS = ["Hi", "Hello", "Hey", "Hi there", "Hello!", "Good morning", "Good evening", "Hey there"]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What can I do for you?",
                    "Hello! Ask me anything."]
THANKS = ["Thanks!", "Thank you.", "Great, thanks."]
SYSTEMS = ["You are a helpful assistant.", "You are GPT2Chat. Answer briefly.", "Be short and friendly."]
RUDE = ["Figure it out yourself.", "I don't care.", "Why would I tell you?", "Stop asking me things."]


def _sum(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    shown = {"+": "+", "-": "-", "*": "x"}[op]
    return f"What is {a} {shown} {b}?", f"{a} {shown} {b} = {value}.", value


def _single_turn(rng: random.Random) -> tuple[str, str, str]:
    """(question, right answer, wrong answer)."""
    kind = rng.choice(["sum", "sum", "capital", "capital", "opposite", "count", "greet", "who"])
    if kind == "sum":
        question, answer, value = _sum(rng)
        wrong = answer.replace(f"= {value}.", f"= {value + rng.choice([-3, -1, 1, 2, 5])}.")
        return question, answer, wrong
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        other = rng.choice([c for c in sorted(CAPITALS) if c != country])
        return (f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}.",
                f"The capital of {country} is {CAPITALS[other]}.")
    if kind == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        return (f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}.",
                f"The opposite of {word} is {word}.")
    if kind == "count":
        n = rng.randint(3, 8)
        return (f"Count from 1 to {n}.", ", ".join(str(i) for i in range(1, n + 1)) + ".",
                ", ".join(str(i) for i in range(1, n)) + ".")
    if kind == "greet":
        return rng.choice(GREETINGS), rng.choice(GREETING_REPLIES), rng.choice(RUDE)
    return ("Who are you?", "I am GPT2Chat, a small chat assistant.", "Nobody you need to know.")


def _follow_up(rng: random.Random) -> list[dict]:
    """Two or three turns where the later question leans on the earlier answer."""
    if rng.random() < 0.5:
        first, second = rng.sample(sorted(CAPITALS), 2)
        turns = [(f"What is the capital of {first}?", f"The capital of {first} is {CAPITALS[first]}."),
                 (f"And what about {second}?", f"The capital of {second} is {CAPITALS[second]}.")]
    else:
        a, b, c = rng.randint(1, 12), rng.randint(1, 12), rng.randint(1, 9)
        turns = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}."),
                 (f"Now add {c} to that.", f"{a + b} + {c} = {a + b + c}.")]
    if rng.random() < 0.4:
        turns.append((rng.choice(THANKS), "You're welcome!"))
    messages = []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def sft_conversations(n: int = 400, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        if rng.random() < 0.25:
            messages = _follow_up(rng)
        else:
            question, answer, _ = _single_turn(rng)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] + messages
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": messages})
    return rows


def preference_pairs(n: int = 200, seed: int = SEED + 1) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        question, answer, wrong = _single_turn(rng)
        if rng.random() < 0.3:
            wrong = rng.choice(RUDE)
        if question in seen or wrong == answer:
            continue
        seen.add(question)
        user = {"role": "user", "content": question}
        rows.append({"prompt": question, "chosen": [user, {"role": "assistant", "content": answer}],
                     "rejected": [user, {"role": "assistant", "content": wrong}]})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from gpt2chat.atomic_files import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_samples(out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sft, pref = out / "quickstart_sft.jsonl", out / "quickstart_pref.jsonl"
    _write_jsonl(sft, sft_conversations())
    _write_jsonl(pref, preference_pairs())
    return sft, pref


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "resources"
    for written in write_samples(sys.argv[1] if len(sys.argv) > 1 else default):
        print(written)
