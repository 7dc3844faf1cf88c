"""Replies of a checkpoint to chat prompts, through its own template: for BLEU rows and side-by-side.

Prompts are message lists ending in a user turn; each renders with the generation prompt, the engine
decodes (greedy, or seeded sampling) until the template's end-of-turn / end-of-text or the token budget,
and the text is cut at the template's stop strings. The engine works on ids, this module on text.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["stop_ids_and_strings", "generate_replies"]


def stop_ids_and_strings(tokenizer, template: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Token ids that end a reply under `template` (plus end-of-text) and its textual stop strings."""
    from gpt2chat.templates import get_template

    spec = get_template(template)
    ids = {int(tokenizer.eos_token_id)}
    for token in getattr(spec, "stop_tokens", ()) or ():
        token_id = token if isinstance(token, int) else tokenizer.token_to_id(token)
        if token_id is not None:
            ids.add(int(token_id))
    strings = tuple(s for s in (getattr(spec, "stop_strings", ()) or ()) if s)
    return tuple(sorted(ids)), strings


def _cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    cut = len(text)
    for stop in stop_strings:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut].strip()


def generate_replies(model, tokenizer, template: str, prompts: Sequence[list[dict]], *,
                     max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0, batch_size: int = 8, desc: str = "generating", progress: bool = True
                     ) -> list[str]:
    """One reply per prompt (message lists ending in a user turn). Prompts longer than the context
    minus `max_new_tokens` keep their last tokens. Deterministic: greedy, or sampling seeded by `seed`."""
    import torch
    from tqdm.auto import tqdm

    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SamplingParams
    from gpt2chat.templates import render_chat

    context = int(model.config.n_positions)
    max_new_tokens = max(1, min(max_new_tokens, context - 1))
    stop_ids, stop_strings = stop_ids_and_strings(tokenizer, template)
    prompt_ids = []
    for messages in prompts:
        ids, _ = render_chat(tokenizer, messages, template=template, add_generation_prompt=True)
        prompt_ids.append(list(ids)[-(context - max_new_tokens):])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=stop_ids, seed=seed if temperature > 0 else None)
    parameter = next(model.parameters())
    engine = Engine(model, device=parameter.device, dtype=parameter.dtype)
    replies: list[str] = []
    torch.manual_seed(seed)
    starts = range(0, len(prompt_ids), max(1, batch_size))
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        results = engine.generate(prompt_ids[start : start + batch_size], params)
        for result in results:
            token_ids = [t for t in result.token_ids if t not in stop_ids]
            text = tokenizer.decode(token_ids, skip_special_tokens=True)
            replies.append(_cut_at_stop_strings(text, stop_strings))
    return replies
