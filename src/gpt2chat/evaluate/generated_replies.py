"""Replies of a checkpoint to chat prompts, through its own template: for BLEU rows and side-by-side.

Prompts are message lists ending in a user turn. They go through the one text pipeline every front end
uses (`gpt2chat.pipeline.TextPipeline`): fitted to the context (oldest turns first, never tokens off the
front), decoded by the engine (greedy, or seeded sampling) until the template's stop ids or the token
budget, and shown as every front end shows a reply (reply prefix removed, cut at the template's stop
strings). The engine works on ids, this module on conversations.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpt2chat.errors import Gpt2ChatError

__all__ = ["generate_replies"]


def generate_replies(model, tokenizer, template: str, prompts: Sequence[list[dict]], *,
                     max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0, batch_size: int = 8, desc: str = "generating", progress: bool = True
                     ) -> list[str]:
    """One reply per prompt (message lists ending in a user turn), stripped of surrounding whitespace.
    Deterministic: greedy, or sampling seeded by `seed`. A prompt whose last message alone does not fit
    the context raises `PromptTooLongError` naming the prompt."""
    import torch
    from tqdm.auto import tqdm

    from gpt2chat.device import model_device_dtype
    from gpt2chat.engine import Engine
    from gpt2chat.pipeline import TextPipeline
    from gpt2chat.sampling import SamplingParams

    pipeline = TextPipeline.for_model(model, tokenizer, template)
    max_new_tokens = max(1, min(max_new_tokens, pipeline.context - 1))
    prompt_ids = []
    for index, messages in enumerate(prompts):
        try:
            prompt_ids.append(pipeline.fit(messages, max_new_tokens).ids)
        except Gpt2ChatError as exc:
            raise type(exc)(f"prompt {index + 1} of {len(prompts)}: {exc}") from exc
    base = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed if temperature > 0 else None)
    engine = Engine(model, *model_device_dtype(model))
    replies: list[str] = []
    torch.manual_seed(seed)
    starts = range(0, len(prompt_ids), max(1, batch_size))
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        batch = prompt_ids[start : start + batch_size]
        for result in engine.generate(batch, [pipeline.params(base, len(ids)) for ids in batch]):
            text, _ = pipeline.decode(result.token_ids)
            replies.append(text.strip())
    return replies
