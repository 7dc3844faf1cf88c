"""The data package's value types: conversations, preference pairs, tokenized examples, budgets, load reports.

Plain dataclasses with no I/O and no tokenizer: every other module of `gpt2chat.data` passes these around.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gpt2chat.errors import Gpt2ChatError

# What to do with a last user turn that alone is over the prompt budget: cut its text keeping the end (what
# TRL's DPO did with max_prompt_length before 1.x: the question is usually at the end), keep the start, or
# drop the example.
PROMPT_TRUNCATIONS = ("keep_end", "keep_start", "drop")


class DataError(Gpt2ChatError):
    """A dataset could not be read: the message names the file, the line / row and the field."""


@dataclass
class Conversation:
    """Plain {"role", "content"} messages (optional system first, then user/assistant alternating, ending with
    assistant; a tool-use row adds "tool" turns after an assistant whose content holds its calls, see
    `templates.flatten`)."""

    messages: list[dict]
    source: str  # "file:line" (jsonl), "file#row" (json / parquet), "hub-id#split:row"


@dataclass
class PreferencePair:
    """One prompt (messages ending with a user turn) and two candidate assistant replies."""

    prompt: list[dict]
    chosen: str
    rejected: str
    source: str


@dataclass
class SFTExample:
    """Token ids of one rendered conversation; `assistant_mask` is 1 on the trained reply + end-of-turn."""

    input_ids: list[int]
    assistant_mask: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferenceExample:
    """Prompt ids (ending with the generation prompt) and the two reply ids.

    A reply ends with the template's end-of-turn token unless it was cut to `max_response_length` (then, as in
    TRL, it simply stops: a cut reply must not teach the model to stop there). The trainer builds the masks as
    zeros over the prompt and ones over the reply.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str


VAL_FRACTION = 0.02  # the share held out for validation: training's and `gpt2chat data stats`' one default


@dataclass(frozen=True)
class Budgets:
    """Token budgets. `None` means no limit for that part.

    SFT: the context (system + history + last user turn) is cut from the oldest turn first; an example whose
    reply does not fit is dropped. Preferences: replies are cut to `max_response_length` (like seed 002 / TRL),
    the prompt to `max_prompt_length` by dropping the oldest turns first. In both, a last user turn that alone
    is still over budget is cut as `prompt_truncation` says (PROMPT_TRUNCATIONS); every cut is counted.
    """

    max_prompt_length: int | None = None
    max_response_length: int | None = None
    max_length: int = 512
    prompt_truncation: str = "keep_end"

    def __post_init__(self) -> None:
        if self.prompt_truncation not in PROMPT_TRUNCATIONS:
            raise DataError(f"Budgets.prompt_truncation must be one of {', '.join(PROMPT_TRUNCATIONS)}, "
                            f"got {self.prompt_truncation!r}")
        for name in ("max_prompt_length", "max_response_length", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DataError(f"Budgets.{name} must be a positive integer or None, got {value!r}")

    @classmethod
    def sft(cls, max_length: int = 512) -> Budgets:
        return cls(max_prompt_length=None, max_response_length=None, max_length=max_length)

    @classmethod
    def preference(cls) -> Budgets:
        """Seed 002's budgets: prompt 96, response 64, total 160."""
        return cls(max_prompt_length=96, max_response_length=64, max_length=160)


SFT_BUDGETS = Budgets.sft()
PREFERENCE_BUDGETS = Budgets.preference()


@dataclass
class LoadReport:
    """What happened while reading one source: rows read, items kept, and every skip counted by reason."""

    source: str
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    problems: list[str] = field(default_factory=list)  # the first few messages, for the summary
    info: dict = field(default_factory=dict)  # format-specific counts, e.g. {"trees": 191} for oasst
    max_problems: int = 20

    def drop(self, reason: str, count: int = 1) -> None:
        """Count a skip that is a choice, not a fault (deleted message, other language, duplicate...)."""
        self.dropped[reason] += count

    def problem(self, reason: str, message: str, strict: bool) -> None:
        """A malformed row: stop at once when strict, else count it and keep its message for the summary."""
        if strict:
            raise DataError(message)
        self.dropped[reason] += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(message)

    @property
    def n_problems(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: LoadReport) -> None:
        self.rows += other.rows
        self.kept += other.kept
        self.dropped.update(other.dropped)
        for name, value in other.info.items():
            self.info[name] = self.info.get(name, 0) + value
        room = self.max_problems - len(self.problems)
        self.problems.extend(other.problems[: max(room, 0)])

    def summary(self) -> str:
        extra = "".join(f", {value} {name}" for name, value in self.info.items())
        lines = [f"{self.source}: {self.rows} rows read{extra}, {self.kept} kept"]
        for reason, count in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  skipped {count:>6}  {reason}")
        if self.problems:
            lines.append("  first problems:")
            lines.extend(f"    {message}" for message in self.problems)
            hidden = sum(self.dropped.values()) - len(self.problems)
            if hidden > 0 and len(self.problems) == self.max_problems:
                lines.append("    ...")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped),
                "problems": list(self.problems), "info": dict(self.info)}

    @classmethod
    def from_dict(cls, data: dict) -> LoadReport:
        return cls(source=data["source"], rows=data["rows"], kept=data["kept"],
                   dropped=Counter(data["dropped"]), problems=list(data["problems"]), info=dict(data.get("info", {})))
