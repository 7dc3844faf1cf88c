"""A small multiple-choice task for lm-evaluation-harness, written locally (YAML + JSONL) for offline tests.

One helper for every test that runs lm-eval for real: the evaluation tests (lm-eval's `hf` backend on a
checkpoint folder) and the serving tests (lm-eval's `local-completions` against our server). The data is
a local JSON-lines file read by the `json` builder of `datasets`, so nothing reaches for the hub.

    from lm_eval_tasks import write_multiple_choice_task
    task_yaml = write_multiple_choice_task(tmp_path)        # -> tmp_path / "gpt2chat_mc.yaml"
"""

from __future__ import annotations

import json
from pathlib import Path

# (question, choices, index of the right choice); choices are scored as " " + choice after the question
QUESTIONS = (
    ("The capital of France is", ["Paris", "Rome", "Tokyo"], 0),
    ("Two plus two is", ["four", "seven"], 0),
    ("The opposite of hot is", ["warm", "cold", "sunny", "big"], 1),
    ("A spider has", ["six legs", "eight legs"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin"], 0),
    ("The colour of a clear sky is", ["green", "blue", "red"], 1),
    ("The largest planet of the solar system is", ["Mars", "Venus", "Jupiter"], 2),
    ("One week has", ["five days", "seven days", "ten days"], 1),
)


def write_multiple_choice_task(folder: str | Path, name: str = "gpt2chat_mc",
                               questions=QUESTIONS) -> Path:
    """Write `folder/NAME.jsonl` and the task file `folder/NAME.yaml` (metric `acc`); return the YAML path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in questions),
                    encoding="utf-8")
    task = folder / f"{name}.yaml"
    task.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n",
        encoding="utf-8")
    return task
