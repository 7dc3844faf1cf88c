"""lm-evaluation-harness scores a checkpoint through our server exactly as it scores it in-process.

The real lm-eval runs a small multiple-choice task (local YAML + JSON lines, offline) twice on the tiny
checkpoint: once with its `local-completions` model against our `/v1/completions` (token-id prompts,
`echo`, `logprobs`, `max_tokens: 1`: what its loglikelihood requests send), once with its `hf` backend
on the same folder (transformers in fp32). Same accuracy, and every choice's log-likelihood equal to 1e-4
(the two sides run different kernels: our engine's KV-cache prefill against transformers' forward).
The tokenizer comes from the checkpoint folder, so nothing reaches for the hub.
"""

from __future__ import annotations

import logging

import pytest

from gpt2chat.serve.app import create_app
from lm_eval_tasks import write_multiple_choice_task
from serve_support import ServerThread, tiny_service

lm_eval = pytest.importorskip("lm_eval")

TOLERANCE = 1e-4


def per_choice_loglikelihoods(results: dict, task: str) -> list[list[float]]:
    """[[log-likelihood of each choice] per question], in the task's document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]


def run(model: str, model_args: str, task_folder, task: str) -> dict:
    from lm_eval.tasks import TaskManager  # without lm-eval's own tasks: indexing them takes a minute

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], device="cpu",
                                   task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
                                   log_samples=True,
                                   batch_size=1 if model == "hf" else 4, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def test_lm_eval_through_the_server_equals_lm_eval_in_process(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    task = "gpt2chat_mc"
    write_multiple_choice_task(tmp_path / "tasks", task)

    service = tiny_service(tiny_checkpoint)
    try:
        with ServerThread(create_app(service)) as server:
            served = run("local-completions",
                         f"model={service.model_name},base_url={server.url}/v1/completions,"
                         f"tokenizer={tiny_checkpoint},tokenizer_backend=huggingface,tokenized_requests=True,"
                         "num_concurrent=1,max_retries=1", tmp_path / "tasks", task)
    finally:
        service.close()
    in_process = run("hf", f"pretrained={tiny_checkpoint},dtype=float32", tmp_path / "tasks", task)

    ours, theirs = per_choice_loglikelihoods(served, task), per_choice_loglikelihoods(in_process, task)
    assert len(ours) == len(theirs) == 8 and [len(q) for q in ours] == [len(q) for q in theirs]
    for question_ours, question_theirs in zip(ours, theirs, strict=True):
        assert question_ours == pytest.approx(question_theirs, abs=TOLERANCE)
    assert served["results"][task]["acc,none"] == in_process["results"][task]["acc,none"]
    # a random model does not score every choice alike: the comparison above has something to compare
    assert len({round(ll, 3) for question in ours for ll in question}) > 8
