"""Speed rows: timed by the engine's own loop, round-robin across checkpoints, median and range of >= 3
repeats of >= 64 decode steps, MBU against the measured read bandwidth; identical models agree."""

from __future__ import annotations

import shutil

import pytest

from gpt2chat.checkpoint import read_config, resolve_checkpoint
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.evaluate.report_card import evaluate_models

# one thread: on a busy 2-core machine, two threads wait on each other longer than a tiny model computes
SPEED_ONLY = dict(skip=("ppl", "pref", "gen", "side"), speed_prompt_tokens=16, speed_decode_steps=64,
                  peak_matmul_size=128, peak_read_bytes=8 << 20, peak_repeats=3, threads=1, progress=False)


@pytest.fixture(scope="module")
def two_copies(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("copies")
    return [str(shutil.copytree(tiny_checkpoint, root / name)) for name in ("first", "second")]


def test_two_copies_of_one_model_report_the_same_speed_within_their_spread(two_copies, tmp_path):
    report = evaluate_models(two_copies, tmp_path / "out", speed_repeats=7, **SPEED_ONLY)
    first, second = (entry["speed"] for entry in report["models"])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        (low_a, high_a), (low_b, high_b) = first[f"{key}_range"], second[f"{key}_range"]
        assert low_a <= high_b and low_b <= high_a, (key, first[f"{key}_range"], second[f"{key}_range"])
    assert first["repeats"] == 7 and first["decode_steps"] == 64 and first["round_robin_with"] == 2
    # MBU divides the bytes a decode step reads by the best read bandwidth of the run's two peak measurements
    peaks = report["peaks"]
    assert len(peaks["measurements"]) == 2
    assert peaks["read_bytes_per_s"] == max(m["read_bytes_per_s"] for m in peaks["measurements"])
    assert first["decode_mbu"] == pytest.approx(
        first["decode_tokens_per_s"] * first["decode_bytes_per_token"] / peaks["read_bytes_per_s"])
    # prefill MFU counts what a prefill computes: the LM head for the last position only (issue 26)
    from gpt2chat.evaluate.flops import prefill_flops

    config = read_config(resolve_checkpoint(two_copies[0]))
    assert first["prefill_mfu"] == pytest.approx(first["prefill_tokens_per_s"] * prefill_flops(
        config, first["prompt_tokens"]) / first["prompt_tokens"] / peaks["matmul_flops_per_s"])
    md = (tmp_path / "out" / "report.md").read_text()
    low, high = first["decode_tokens_per_s_range"]
    if "decode_tokens_per_s" in first["busy_machine"]:  # this shared machine may be busy: then no figure
        assert "busy machine (see below)" in md and "not a result, measured on a busy machine" in md
    else:
        assert f"{first['decode_tokens_per_s']:.1f} ({low:.1f}-{high:.1f})" in md
    assert "round-robin with the other 1 checkpoint(s)" in md and "at the start and at the end of the run" in md


def test_speed_is_timed_by_the_engine_round_robin(two_copies, tmp_path, monkeypatch):
    from gpt2chat.engine import Engine

    calls, timings = [], []
    real_generate = Engine.generate

    def generate(self, prompts, params=None):
        results = real_generate(self, prompts, params)
        calls.append((id(self), len(results[0].token_ids), params.stop_token_ids, params.temperature))
        timings.append((id(self), results[0].ttft_s, results[0].decode_s))
        return results

    monkeypatch.setattr(Engine, "generate", generate)
    report = evaluate_models(two_copies, tmp_path / "out", speed_repeats=3, **SPEED_ONLY)
    engines = list(dict.fromkeys(engine for engine, *_ in calls))
    assert len(engines) == 2
    a, b = engines
    assert [engine for engine, *_ in calls] == [a, b] + [a, b] * 3  # one warm-up each, then 3 rounds
    assert {tuple(rest) for _, *rest in calls} == {(65, (), 0.0)}  # greedy, no stop token: 64 steps after the first
    # each row is the median and range of its own engine's timed runs (the warm-up left out)
    for engine, entry in zip((a, b), report["models"], strict=True):
        speed = entry["speed"]
        runs = [(ttft, decode) for who, ttft, decode in timings[2:] if who == engine]
        decode = sorted(64 / d for _, d in runs)
        prefill = sorted(speed["prompt_tokens"] / t for t, _ in runs)
        assert speed["decode_tokens_per_s"] == pytest.approx(decode[1])
        assert speed["decode_tokens_per_s_range"] == pytest.approx([decode[0], decode[-1]])
        assert speed["prefill_tokens_per_s"] == pytest.approx(prefill[1])
        assert speed["prefill_tokens_per_s_range"] == pytest.approx([prefill[0], prefill[-1]])


@pytest.mark.parametrize(("field", "value"), [("speed_decode_steps", 16), ("speed_repeats", 1)])
def test_too_few_steps_or_repeats_are_refused(tiny_checkpoint, tmp_path, field, value):
    with pytest.raises(Gpt2ChatError, match=f"{field}={value}: must be an integer >= .*trusted"):
        evaluate_models([str(tiny_checkpoint)], tmp_path / "out", **{**SPEED_ONLY, field: value})


def test_quantize_times_the_int8_layout_that_generate_would_run(tiny_checkpoint, tmp_path):
    plain = evaluate_models([str(tiny_checkpoint)], tmp_path / "fp32", **SPEED_ONLY)["models"][0]["speed"]
    int8 = evaluate_models([str(tiny_checkpoint)], tmp_path / "int8", quantize="int8", **SPEED_ONLY)["models"][0]["speed"]
    assert (plain["weights"], int8["weights"]) == ("fp32", "int8")
    # int8 reads a quarter of the projection bytes (plus one fp32 scale per 32 weights): MBU counts that
    assert int8["weight_bytes"] < 0.3 * plain["weight_bytes"]
    assert "int8 weights" in (tmp_path / "int8" / "report.md").read_text()
