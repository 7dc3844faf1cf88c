"""What the trainer tests share (no tests here): synthetic token examples, a tiny GPT of the token
vocabulary below, and a `Trainer` built around them without a tokenizer or dataset files."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2chat.config import get_preset
from gpt2chat.model import GPT
from gpt2chat.train.batching import BatchPlan
from gpt2chat.train.config import TrainConfig
from gpt2chat.train.distributed import DistState
from gpt2chat.train.objectives import SFTObjective
from gpt2chat.train.trainer import Trainer

VOCAB = 96
PAD = 95


@dataclass
class Ex:
    input_ids: list[int]
    assistant_mask: list[int]
    source: str = "synthetic"


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = "synthetic"


def sft_examples(n: int, seed: int = 0) -> list[Ex]:
    """Prompt of random tokens, then a reply that repeats a learnable pattern (so the loss can fall)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(1, 40) for _ in range(rng.randint(3, 10))]
        start = rng.randrange(40, 60)
        reply = [start + (k % 5) for k in range(rng.randint(4, 12))] + [2]
        out.append(Ex(prompt + reply, [0] * len(prompt) + [1] * len(reply)))
    return out


def pref_examples(n: int, seed: int = 0) -> list[Pair]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(1, 40) for _ in range(rng.randint(3, 8))]
        chosen = [60 + (k % 3) for k in range(rng.randint(3, 7))] + [2]
        rejected = [rng.randrange(70, 90) for _ in range(rng.randint(3, 7))] + [2]
        out.append(Pair(prompt, chosen, rejected))
    return out


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = get_preset(
        "tiny", vocab_size=VOCAB, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT(config)


def write_model(model, folder: Path) -> None:
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, folder / "weights.pt")


def make_trainer(
    tmp: Path, examples, kind="sft", objective=None, model=None, name=None, **overrides
) -> Trainer:
    values = dict(
        objective=name or ("sft" if kind == "sft" else "orpo"),
        data=["synthetic"],
        out=str(tmp),
        lr=3e-3,
        batch_size=4,
        grad_accum=1,
        max_steps=12,
        schedule="constant",
        max_length=64,
        progress=False,
        seed=0,
        max_grad_norm=1.0,
        pack=False,
    )
    values.update(overrides)
    cfg = TrainConfig(**values).validate()
    plan = BatchPlan(
        examples,
        kind,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        world_size=1,
        seed=cfg.seed,
        max_length=cfg.max_length,
        pad_id=PAD,
        pack=cfg.pack,
    )
    objective = objective or SFTObjective()
    return Trainer(
        cfg, model or tiny_model(), objective, plan, None, DistState(), torch.device("cpu"), write_model
    )


def losses_of(result) -> list[float]:
    return [r["loss"] for r in result.history]
