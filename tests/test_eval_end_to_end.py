"""`gpt2chat eval` end to end on two tiny checkpoints and small fixture data, plus cross-checks of the
figures against independent computations (cross-entropy by hand, a reference equal to the policy)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpt2chat.cli import main
from gpt2chat.evaluate.report_card import evaluate_models

FAST = dict(speed_prompt_tokens=8, speed_decode_steps=64, speed_repeats=3, peak_matmul_size=64,
            peak_read_bytes=1 << 20, peak_repeats=1, max_new_tokens=4, gen_rows=2, heldout_prompts=0, progress=False)


def _oasst_rows():
    rows = []
    for tree, (question, answer, other) in enumerate([
        ("What is the capital of France?", "The capital of France is Paris.", "Paris, I think."),
        ("Name a primary colour.", "Red is a primary colour.", "Blue."),
        ("How many legs has a spider?", "A spider has eight legs.", "Eight."),
    ]):
        root = f"t{tree}-q"
        rows.append({"message_id": root, "parent_id": None, "role": "prompter", "text": question, "lang": "en",
                     "message_tree_id": root, "rank": None})
        rows.append({"message_id": f"t{tree}-a", "parent_id": root, "role": "assistant", "text": answer,
                     "lang": "en", "message_tree_id": root, "rank": 0})
        rows.append({"message_id": f"t{tree}-b", "parent_id": root, "role": "assistant", "text": other,
                     "lang": "en", "message_tree_id": root, "rank": 1})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gpt2chat.checkpoint import init_checkpoint

    root = tmp_path_factory.mktemp("eval")
    sft = init_checkpoint("tiny", root / "run-sft" / "final", template="llama3-context", seed=0)
    other = init_checkpoint("tiny", root / "run-b" / "final", template="user-assistant", seed=1)
    (root / "run-sft" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 - 0.1 * s, "split": "train"}) + "\n" for s in range(1, 6))
        + json.dumps({"step": 5, "loss": 4.8, "split": "val"}) + "\n")
    data = root / "oasst.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _oasst_rows()))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Say hello.", "chosen": "Hello there!", "rejected": "No."},
        {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "Banana."},
    ]))
    return {"root": root, "sft": str(sft), "other": str(other), "data": f"oasst1:{data}",
            "pairs": f"ultrafeedback:{pairs}"}


def test_cli_writes_the_report_card(setup, capsys):
    out = setup["root"] / "out"
    status = main(["eval", "--model", setup["sft"], "--model", setup["other"], "--data", setup["data"],
                   "--pref-data", setup["pairs"], "--max-rows", "3", "--gen-rows", "2", "--max-new-tokens", "4",
                   "--speed-prompt-tokens", "8", "--speed-decode-steps", "64", "--speed-repeats", "3",
                   "--out", str(out), "--seed", "3",
                   "--no-progress"])
    assert status == 0
    assert "report:" in capsys.readouterr().out
    for name in ("report.md", "report.json", "perplexity.png", "loss_curves.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["run-sft/final", "run-b/final"]
    assert [m["template"] for m in report["models"]] == ["llama3-context", "user-assistant"]
    for entry in report["models"]:
        ppl = entry["perplexity"]
        assert ppl["assistant"]["sequences"] == 3 and ppl["assistant"]["tokens"] > 0
        assert 1 < ppl["assistant"]["ppl"] < math.inf
        assert "oasst.jsonl" in ppl["measured_on"] and entry["template"] in ppl["measured_on"]
        assert "cpu, float32" in ppl["measured_on"] and "threads" in ppl["measured_on"]
        pref = entry["preference"]
        assert pref["mode"] == "reference-free" and pref["pairs"] == 2 and 0 <= pref["accuracy"] <= 1
        gen = entry["generation"]
        assert gen["replies"] == 2 and 0 <= gen["bleu"] <= 100 and len(gen["samples"]) == 2
        assert entry["flops"]["forward_per_token"] > 2 * entry["parameters"] * 0.5
        assert entry["speed"]["decode_tokens_per_s"] > 0 and entry["speed"]["decode_mbu"] > 0
    assert report["models"][0]["metrics_log"].endswith("run-sft/metrics.jsonl")
    assert "metrics_log" not in report["models"][1]
    items = report["side_by_side"]["items"]
    # seed 000's three prompts, then the first held-out conversations' (their reference reply beside)
    assert [(i["prompt"], i["source"]) for i in items] == [
        ("What's the best way to learn Python?", "seed 000"), ("How can I improve my English skills?", "seed 000"),
        ("How can we maintain our well-being?", "seed 000"), ("What is the capital of France?", "held-out"),
        ("Name a primary colour.", "held-out"), ("How many legs has a spider?", "held-out")]
    assert items[3]["reference"] == "The capital of France is Paris."
    assert all(set(i["replies"]) == {"run-sft/final", "run-b/final"} for i in items)
    assert report["side_by_side"]["decoding"] == "greedy (temperature 0)"
    speed = report["models"][0]["speed"]
    assert speed["decode_steps"] == 64 and speed["repeats"] == 3 and speed["round_robin_with"] == 2
    low, high = speed["decode_tokens_per_s_range"]
    assert low <= speed["decode_tokens_per_s"] <= high
    md = (out / "report.md").read_text()
    for heading in ("## Summary", "## Perplexity", "## Preference accuracy", "## Generated replies",
                    "## Size, compute and speed", "## Side-by-side replies", "![loss curves](loss_curves.png)",
                    "greedy (temperature 0)", "cut at its template's end-of-turn token", "`<|eot_id|>, <|endoftext|>`",
                    "(held-out reference)"):
        assert heading in md


def test_perplexity_equals_cross_entropy_computed_by_hand(setup):
    from gpt2chat.checkpoint import load_model
    from gpt2chat.data import load_conversations
    from gpt2chat.templates import render_chat

    report = evaluate_models([setup["sft"]], setup["root"] / "ppl", data=setup["data"],
                             skip=("pref", "gen", "speed", "side"), **FAST)
    got = report["models"][0]["perplexity"]

    model, tokenizer = load_model(setup["sft"], device="cpu", dtype=torch.float32)
    conversations, _ = load_conversations(setup["data"])
    nll, count, plain_nll, plain_count, all_nll, all_count = 0.0, 0, 0.0, 0, 0.0, 0
    with torch.no_grad():
        for conversation in conversations:
            ids, mask = render_chat(tokenizer, conversation.messages, template="llama3-context")
            ids = torch.tensor([ids])
            logits = model(ids)[0, :-1]
            targets = ids[0, 1:].clone()
            all_nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            all_count += len(targets)
            targets[torch.tensor(mask[1:]) == 0] = -100
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += int((targets != -100).sum())
            reply = [tokenizer.eos_token_id, *tokenizer.encode(conversation.messages[-1]["content"])]
            reply = torch.tensor([reply])
            plain_nll += torch.nn.functional.cross_entropy(model(reply)[0, :-1], reply[0, 1:], reduction="sum").item()
            plain_count += reply.shape[1] - 1
    assert got["assistant"]["tokens"] == count
    assert got["assistant"]["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert got["plain"]["ppl"] == pytest.approx(math.exp(plain_nll / plain_count), rel=1e-4)
    assert got["rendered"]["ppl"] == pytest.approx(math.exp(all_nll / all_count), rel=1e-4)
    assert got["assistant"]["ppl"] != pytest.approx(got["rendered"]["ppl"], rel=1e-6)


def test_reference_equal_to_policy_and_seeded_sampling_are_deterministic(setup):
    kwargs = dict(ref=setup["sft"], pref_data=setup["pairs"], data=setup["data"], skip=("ppl", "speed"),
                  prompts=["Hello!"], temperature=1.0, seed=7, **{**FAST, "max_new_tokens": 6})
    first = evaluate_models([setup["sft"]], setup["root"] / "s1", **kwargs)
    pref = first["models"][0]["preference"]
    assert pref["mode"] == "dpo" and pref["reference"] == setup["sft"]
    assert pref["mean_margin"] == 0.0 and pref["accuracy"] == 0.0 and pref["ties"] == 2
    second = evaluate_models([setup["sft"]], setup["root"] / "s2", **kwargs)
    assert first["side_by_side"]["items"] == second["side_by_side"]["items"]
    assert first["models"][0]["generation"]["samples"] == second["models"][0]["generation"]["samples"]


def test_a_conversation_too_long_for_the_context_is_skipped_with_its_reason_not_the_end_of_the_report(setup):
    """`gpt2chat eval` on data with a prompt no turn-dropping can fit (the tiny model's 256 positions) once
    exited 2 ("prompt 2 of 16: the prompt is too long"); now the row is passed over and counted, every
    section still reports, and the perplexity columns cover the same rows."""
    root = setup["root"]
    rows = [{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
            {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "Ok."}]},
            {"messages": [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes. " * 300}]},
            {"messages": [{"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Bye!"}]}]
    data = root / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {**FAST, "gen_rows": 4, "prompts": ["word " * 400, "Hello"], "skip": ("speed",)}
    report = evaluate_models([setup["sft"]], root / "long-out", data=f"messages:{data}", pref_data=setup["pairs"],
                             **config)
    entry = report["models"][0]
    gen = entry["generation"]
    assert gen["replies"] == 3 and gen["skipped"] == 1
    assert gen["skip_reasons"] == {"prompt over the 256-token context even with its old turns dropped": 1}
    assert "1 passed over: 1 prompt over the 256-token context" in gen["measured_on"]
    ppl = entry["perplexity"]
    # the long question is scored with its text cut as training cuts it; the reply of 300 "Yes." cannot fit
    assert {view: ppl[view]["sequences"] for view in ("assistant", "rendered", "plain")} == {
        "assistant": 3, "rendered": 3, "plain": 3}  # one row set: the plain column skips what the others skip
    for view in ("assistant", "rendered", "plain"):
        assert ppl[view]["skipped"] == 1 and ppl[view]["skip_reasons"] == {"reply over max_length": 1}
    assert "1 skipped: 1 reply over max_length" in ppl["measured_on"]
    side = report["side_by_side"]
    assert side["items"][0]["replies"][entry["label"]].startswith("(skipped: prompt over the 256-token context")
    assert (root / "long-out" / "report.md").is_file()
