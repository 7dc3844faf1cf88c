"""One checkpoint through every measurement: the per-model half of `evaluate_models`.

`evaluate_one` loads the checkpoint, renders the held-out data through the checkpoint's own template
(`tokenizer.template_name`), and returns one report entry: size and FLOPs, perplexity, preference
accuracy (against a shared `Reference` when given), generated-reply metrics, the side-by-side replies
and the harness rows. Speed is a phase of its own over all checkpoints together (`speed_entries`,
then `add_utilisation` against the run's peaks). Each figure carries a `measured_on` line.
"""

from __future__ import annotations

import gc
from collections import Counter

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.evaluate import reply_metrics

__all__ = ["Reference", "evaluate_one", "template_of", "generation_rows", "speed_entries", "add_utilisation"]

DEFAULT_TEMPLATE = "llama3-context"


def template_of(tokenizer) -> tuple[str, str]:
    """(template name, where it came from): the checkpoint's own, or the default when it names none."""
    name = getattr(tokenizer, "template_name", None)
    return (name, "checkpoint") if name else (DEFAULT_TEMPLATE, "default (the checkpoint names no template)")


def _load(path: str, device, dtype):
    from gpt2chat.checkpoint import load_model

    model, tokenizer = load_model(path, device=device, dtype=dtype)
    model.eval()
    return model, tokenizer


def _free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Reference:
    """The frozen reference of DPO-style rewards: loaded once, its log-probs cached per token sequence."""

    def __init__(self, path: str, device, dtype):
        self.path = path
        self.model, self.tokenizer = _load(path, device, dtype)
        self._cache: dict[tuple[int, ...], tuple[float, int]] = {}

    def check_vocab(self, tokenizer, label: str) -> None:
        if int(self.model.config.vocab_size) < len(tokenizer):
            raise Gpt2ChatError(
                f"--ref {self.path}: its vocabulary ({self.model.config.vocab_size} tokens) lacks tokens of "
                f"{label}'s tokenizer ({len(tokenizer)}); a DPO reference must share the policy's tokenizer "
                "(use the SFT checkpoint the preference run started from)")

    def score(self, sequences, masks, batch_tokens: int, progress: bool) -> list[tuple[float, int]]:
        from gpt2chat.evaluate.scoring import score_sequences

        keys = [(*seq, -1, *mask) for seq, mask in zip(sequences, masks, strict=True)]
        todo = [i for i, key in enumerate(keys) if key not in self._cache]
        if todo:
            fresh = score_sequences(self.model, [sequences[i] for i in todo], [masks[i] for i in todo],
                                    batch_tokens=batch_tokens, desc="reference log-probs", progress=progress)
            for i, value in zip(todo, fresh, strict=True):
                self._cache[keys[i]] = value
        return [self._cache[key] for key in keys]

    def close(self) -> None:
        _free(self.model)
        self.model = None


def _perplexity(model, tokenizer, template, config, conversations, info, where) -> dict:
    from gpt2chat.evaluate.scoring import conversation_sets, score_sequences, score_sequences_multi

    context = int(model.config.n_positions)
    sets = conversation_sets(conversations, tokenizer, template, context)
    for view, scoring_set in sets.items():
        if not scoring_set.sequences:
            raise Gpt2ChatError(f"{info['spec']}: no conversation has {view} tokens to score under template "
                                f"{template!r} (zero usable rows)")
    score = dict(batch_tokens=config.batch_tokens, progress=config.progress)
    # "assistant" and "rendered" share their ids: one forward scores both masks
    assistant, rendered = sets["assistant"], sets["rendered"]
    scored = dict(zip(("assistant", "rendered"), score_sequences_multi(
        model, assistant.sequences, [assistant.masks, rendered.masks], desc="perplexity (chat)", **score),
        strict=True))
    scored["plain"] = score_sequences(model, sets["plain"].sequences, sets["plain"].masks,
                                      desc="perplexity (plain)", **score)
    result = {}
    for view, scoring_set in sets.items():
        total_logp = sum(s for s, _ in scored[view])
        tokens = sum(c for _, c in scored[view])
        result[view] = {"ppl": reply_metrics.perplexity(total_logp, tokens), "nll": -total_logp / tokens,
                        "tokens": tokens, "sequences": len(scored[view]), "truncated": scoring_set.truncated,
                        "skipped": scoring_set.skipped, "skip_reasons": dict(scoring_set.skip_reasons)}
    result["measured_on"] = (
        f"{info['spec']}: {result['assistant']['sequences']} conversations, the same in every column "
        f"({info['used']} used of {info['kept']} kept, {info['rows_read']} rows read), "
        f"{result['assistant']['truncated']} with their oldest turns dropped to fit {context} tokens, "
        f"{sets['assistant'].skipped_text()}; assistant = last reply + end-of-turn through template {template}; "
        f"plain = that reply as plain text after <|endoftext|>; {where}")
    return result


def _preference(model, tokenizer, template, label, config, pairs, info, reference, where) -> dict:
    from gpt2chat.evaluate.scoring import preference_sets, score_sequences

    context = int(model.config.n_positions)
    chosen, rejected = preference_sets(pairs, tokenizer, template, context, config.max_reply_tokens)
    if not chosen.sequences:
        raise Gpt2ChatError(f"{info['spec']}: no pair has reply tokens to score under template {template!r} "
                            "(zero usable rows)")
    score = dict(batch_tokens=config.batch_tokens, progress=config.progress)
    good = score_sequences(model, chosen.sequences, chosen.masks, desc="preference (chosen)", **score)
    bad = score_sequences(model, rejected.sequences, rejected.masks, desc="preference (rejected)", **score)
    kwargs = {}
    if reference is not None:
        reference.check_vocab(tokenizer, label)
        ref_good = reference.score(chosen.sequences, chosen.masks, config.batch_tokens, config.progress)
        ref_bad = reference.score(rejected.sequences, rejected.masks, config.batch_tokens, config.progress)
        kwargs = {"ref_chosen_logps": [s for s, _ in ref_good], "ref_rejected_logps": [s for s, _ in ref_bad]}
    scores = reply_metrics.preference_scores([s for s, _ in good], [s for s, _ in bad],
                                       chosen_counts=[c for _, c in good], rejected_counts=[c for _, c in bad],
                                       beta=config.beta, **kwargs)
    reward = (f"DPO implicit reward beta*(log pi - log pi_ref) summed over reply tokens, beta {config.beta}, "
              f"reference {reference.path}" if reference is not None else
              "reference-free: average per-token log-prob of the reply")
    return {
        "accuracy": scores.accuracy, "mean_margin": scores.mean_margin,
        "mean_chosen_reward": scores.mean_chosen_reward, "mean_rejected_reward": scores.mean_rejected_reward,
        "pairs": scores.pairs, "ties": scores.ties, "skipped": chosen.skipped,
        "skip_reasons": dict(chosen.skip_reasons), "mode": scores.mode,
        "beta": config.beta if reference is not None else None,
        "reference": reference.path if reference is not None else None,
        "measured_on": (f"{info['spec']}: {scores.pairs} pairs ({chosen.skipped_text()}; replies cut to "
                        f"{config.max_reply_tokens} tokens, {chosen.truncated + rejected.truncated} replies cut), "
                        f"template {template}; {reward}; {where}"),
    }


def generation_rows(conversations, limit: int, reason_to_skip=None, skipped: Counter | None = None
                    ) -> tuple[list[list[dict]], list[str]]:
    """(prompt messages ending in a user turn, the reference reply) of the first `limit` usable conversations.

    `reason_to_skip(prompt)` (optional) names why a prompt cannot be used (None: it can); such rows are
    passed over and counted by reason in `skipped`."""
    prompts, references = [], []
    for conversation in conversations:
        messages = conversation.messages
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0 or messages[last - 1].get("role") != "user":
            continue
        reason = reason_to_skip(messages[:last]) if reason_to_skip is not None else None
        if reason is not None:
            if skipped is not None:
                skipped[reason] += 1
            continue
        prompts.append(messages[:last])
        references.append(messages[last]["content"])
        if len(prompts) == limit:
            break
    return prompts, references


def prompt_fit_check(model, tokenizer, template: str, config):
    """`prompt -> None or the reason it cannot be answered`: whether the prompt fits the model's context
    by the one rule (`gpt2chat.context_fit`, with the reserve `generate_replies` keeps for the reply), so
    that a row too long for the context is skipped and counted instead of stopping the report."""
    from gpt2chat.context_fit import PromptTooLongError, fit_messages, reply_reserve
    from gpt2chat.reply_text import chat_template

    spec = chat_template(tokenizer, template)
    context = int(model.config.n_positions)
    reserve = reply_reserve(context, max(1, min(config.max_new_tokens, context - 1)))

    def reason(messages: list[dict]) -> str | None:
        try:
            fit_messages(tokenizer, spec, messages, context=context, reserve=reserve)
        except PromptTooLongError:
            return f"prompt over the {context}-token context even with its old turns dropped"
        return None

    return reason


def _decoding(config) -> str:
    if config.temperature == 0:
        return "greedy"
    return f"sampling T={config.temperature} top_k={config.top_k} top_p={config.top_p} seed {config.seed}"


def _generate(model, tokenizer, template, config, prompts, desc):
    from gpt2chat.evaluate.generated_replies import generate_replies

    return generate_replies(model, tokenizer, template, prompts, max_new_tokens=config.max_new_tokens,
                            temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                            seed=config.seed, batch_size=config.batch_size, desc=desc, progress=config.progress)


def _generation(model, tokenizer, template, config, conversations, info, where) -> dict | None:
    skipped: Counter = Counter()
    prompts, references = generation_rows(conversations, config.gen_rows,
                                          prompt_fit_check(model, tokenizer, template, config), skipped)
    if not prompts:
        return None
    replies = _generate(model, tokenizer, template, config, prompts, "replies for BLEU")
    figures = reply_metrics.reply_metrics(replies, references)
    figures["samples"] = [{"prompt": p[-1]["content"], "reference": r, "reply": g}
                          for p, r, g in zip(prompts, references, replies, strict=True)]
    figures["skipped"] = sum(skipped.values())
    figures["skip_reasons"] = dict(skipped)
    passed = "; ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    figures["measured_on"] = (f"{info['spec']}: the last assistant reply of the first {len(prompts)} usable "
                              f"conversations ({sum(skipped.values())} passed over"
                              f"{': ' + passed if passed else ''}), "
                              f"{_decoding(config)}, at most {config.max_new_tokens} new tokens, "
                              f"template {template}; sacrebleu corpus BLEU (13a); {where}")
    return figures


def _side_by_side(model, tokenizer, template, config, prompts) -> list[str]:
    """One reply per prompt; a prompt this model's context cannot hold gets the reason instead."""
    reason_of = prompt_fit_check(model, tokenizer, template, config)
    reasons = [reason_of(prompt) for prompt in prompts]
    fitting = [prompt for prompt, reason in zip(prompts, reasons, strict=True) if reason is None]
    replies = iter(_generate(model, tokenizer, template, config, fitting, "side-by-side replies") if fitting else [])
    return [next(replies) if reason is None else f"(skipped: {reason})" for reason in reasons]


def _compute(model, config) -> tuple[int, dict]:
    from gpt2chat.evaluate import flops

    parameters = flops.count_parameters(model)
    forward = flops.forward_flops_per_token(model.config, config.flops_context)
    return parameters, {"forward_per_token": forward["total"], "weights": forward["weights"],
                        "attention": forward["attention"], "context": forward["context"],
                        "training_per_token": flops.training_flops_per_token(model.config, config.flops_context)}


def _inference_model(path: str, config, device, dtype):
    """The model as `gpt2chat generate` runs it: `load_for_inference` picks the layout (fast fp32, fp16, int8).

    With `quantize` and no explicit dtype, the mode picks its compute dtype (fp16 on CUDA computes in fp16)."""
    from gpt2chat.quantize import load_for_inference

    explicit = dtype if config.dtype is not None or config.quantize is None else None
    return load_for_inference(path, quantize=config.quantize, device=device, dtype=explicit)[0]


def _compute_dtype(model):
    from gpt2chat.device import model_device_dtype

    return model_device_dtype(model)[1]


def _fits_together(paths: list[str], device) -> bool:
    """Whether every model's weights fit in memory at once (round-robin timing holds them all)."""
    import os

    import torch

    from gpt2chat.checkpoint import read_config, resolve_checkpoint
    from gpt2chat.evaluate.flops import analytic_parameters

    need = sum(4 * analytic_parameters(read_config(resolve_checkpoint(p))) for p in paths)  # fp32 upper bound
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.6 * free
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return len(paths) == 1
    return need < 0.4 * total


def speed_entries(paths: list[str], config, *, device, dtype) -> list[tuple[dict, object]]:
    """(speed row, model config) of every model: batch-1 prefill / decode measured round-robin by the
    engine's own loop. The models are loaded as `gpt2chat generate` loads them; when they do not fit in
    memory together, each is timed alone (the rows say so)."""
    from gpt2chat.engine import Engine
    from gpt2chat.evaluate.speed import measure_speeds
    from gpt2chat.quantize import decode_read_bytes, weight_format

    kwargs = dict(prompt_tokens=config.speed_prompt_tokens, decode_steps=config.speed_decode_steps,
                  repeats=config.speed_repeats, seed=config.seed)
    groups = [paths] if _fits_together(paths, device) else [[p] for p in paths]
    rows = []
    for group in groups:
        models = [_inference_model(p, config, device, dtype) for p in group]
        try:
            engines = [Engine(m, device=device, dtype=_compute_dtype(m), prompt_cache=False) for m in models]  # cold prefill
            for model, speed in zip(models, measure_speeds(engines, **kwargs), strict=True):
                speed["weight_bytes"] = decode_read_bytes(model)
                speed["weights"] = weight_format(model)
                rows.append((speed, model.config))
        finally:
            for model in models:
                _free(model)
    return rows


def add_utilisation(speed: dict, model_config, peaks: dict) -> dict:
    """MFU of prefill, MFU and MBU of decode against the run's best measured peaks (in place)."""
    from gpt2chat.evaluate import flops
    from gpt2chat.evaluate.speed import busy_machine_reasons

    prompt, steps = speed["prompt_tokens"], speed["decode_steps"]
    element = {"float32": 4, "bfloat16": 2, "float16": 2}.get(speed["dtype"], 4)
    # prefill: what it computes (token t attends to t keys; the LM head for the last position only);
    # decode: one token at a mean context of P + steps/2, the LM head included
    prefill_flops = flops.prefill_flops(model_config, prompt) / prompt
    decode_context = prompt + max(1, steps // 2)
    decode_flops = flops.forward_flops_per_token(model_config, decode_context)["total"]
    decode_bytes = flops.decode_bytes_per_token(model_config, 0, element, decode_context) + speed["weight_bytes"]
    prefill = flops.utilisation(flops_per_token=prefill_flops, bytes_per_token=decode_bytes,
                                prefill_tokens_per_s=speed["prefill_tokens_per_s"], decode_tokens_per_s=None,
                                peaks=peaks)
    decode = flops.utilisation(flops_per_token=decode_flops, bytes_per_token=decode_bytes,
                               prefill_tokens_per_s=None, decode_tokens_per_s=speed["decode_tokens_per_s"],
                               peaks=peaks)
    speed.update(prefill_mfu=prefill["prefill_mfu"], decode_mfu=decode["decode_mfu"],
                 decode_mbu=decode["decode_mbu"], decode_bytes_per_token=decode_bytes,
                 prefill_flops_per_token=prefill_flops,
                 decode_read_bound_tokens_per_s=peaks["read_bytes_per_s"] / decode_bytes)
    speed["busy_machine"] = busy_machine_reasons(speed)
    low, high = speed["decode_tokens_per_s_range"]
    together = (f"round-robin with the other {speed['round_robin_with'] - 1} checkpoint(s)"
                if speed["round_robin_with"] > 1 else "timed alone")
    speed["measured_on"] = (
        f"batch 1, {prompt}-token random prompt, {steps} greedy decode steps (no stop token), median of "
        f"{speed['repeats']} repeats (decode range {low:.1f}-{high:.1f} tok/s), {together}; timed by the "
        "engine's own loop (ttft_s, decode_s), the model loaded as `gpt2chat generate` loads it; MFU = FLOP/s / "
        "best measured matmul peak, MBU = (projection weights + KV cache bytes read per token) x tokens/s / best "
        f"measured read bandwidth; {speed['device']}, "
        f"{speed['dtype']} compute, {speed['weights']} weights, {speed['threads']} threads")
    return speed


def _end_of_turn(template: str) -> list[str]:
    from gpt2chat.templates import get_template

    return [str(token) for token in get_template(template).stop_tokens]


def evaluate_one(path, label, config, *, device, dtype, env, conversations, conversation_info, pairs, pair_info,
                 reference, prompts, harness_tasks) -> dict:
    """The report entry of one checkpoint (see the module docstring)."""
    skip = set(config.skip)
    model, tokenizer = _load(path, device, dtype)
    template, template_source = template_of(tokenizer)
    where = f"{env['device']}, {env['dtype']}, {env['threads']} threads"
    entry: dict = {"label": label, "path": str(path), "template": template, "template_source": template_source,
                   "model_type": getattr(model.config, "model_type", "gpt2"),
                   "context": int(model.config.n_positions), "end_of_turn": _end_of_turn(template)}
    try:
        entry["parameters"], entry["flops"] = _compute(model, config)
        if "ppl" not in skip:
            entry["perplexity"] = _perplexity(model, tokenizer, template, config, conversations,
                                              conversation_info, where)
        if pairs is not None and "pref" not in skip:
            entry["preference"] = _preference(model, tokenizer, template, label, config, pairs, pair_info,
                                              reference, where)
        if "gen" not in skip:
            entry["generation"] = _generation(model, tokenizer, template, config, conversations,
                                              conversation_info, where)
        if prompts:
            entry["side_by_side_replies"] = _side_by_side(model, tokenizer, template, config, prompts)
    finally:
        _free(model)
    if harness_tasks:
        import sys

        from gpt2chat.evaluate.harness import run_harness

        rows = run_harness(str(path), harness_tasks, device=str(device), dtype=entry_dtype(dtype),
                           batch_size=config.batch_size, limit=config.harness_limit, seed=config.seed)
        for row in rows:
            if row["status"] != "ok":
                print(f"warning: {label}: {row['message']}", file=sys.stderr)
        entry["harness"] = rows
        values = [row["value"] for row in rows if row["status"] == "ok"]
        entry["harness_average"] = sum(values) / len(values) if values and len(values) == len(rows) else None
    return entry


def entry_dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")
