"""Training objectives: SFT, DPO and ORPO as small pure functions of tensors.

Each function takes model outputs (logits or per-sequence log-probabilities) and masks and returns
``(loss, metrics)``; it knows nothing about models, files, tokenizers or optimisers. ``metrics`` holds
detached 0-dim tensors (no host sync is forced; call ``float()`` when logging). Key names follow TRL's
so that logs compare directly.

The causal shift (logits at position t predict the token at t + 1) happens in exactly one place:
:func:`scored_tokens`, and log-probabilities of scored tokens come from one primitive on logits:
:func:`token_logps`, used by the losses here and by evaluation. Training does not materialise the logits:
`gpt2chat.chunked_head` computes the same values (and gradients) from the hidden states chunk by chunk. Every mask passed to this module is aligned with the **tokens** (``labels`` /
``input_ids``), not with the predictions: ``mask[b, t] == 1`` means "token t of row b is scored", the
same convention as the ``assistant_mask`` produced by the chat templates and TRL's ``completion_mask``.
Position 0 has no prediction and is never scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2chat.errors import Gpt2ChatError

Metrics = dict[str, torch.Tensor]

# ORPO needs log(1 - p) for the average per-token probability p; p == 1 (avg log-prob 0) gives infinite
# odds. Average log-probs are capped just below 0, i.e. odds of at most about 1e6 : 1.
_MAX_AVG_LOGP = -1e-6


def _check_beta(beta: float, name: str) -> None:
    if not beta > 0:  # also rejects NaN
        raise Gpt2ChatError(f"{name}: beta must be > 0, got {beta!r}")


def _check_same_shape(name: str, **tensors: torch.Tensor) -> None:
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise Gpt2ChatError(f"{name}: inputs must have the same shape, got {shapes}")


@dataclass(frozen=True, eq=False)
class ScoredTokens:
    """The tokens a loss scores in a batch of rows `[B, T]`, one entry per scored token.

    ``index[i]`` is the flat position ``row * T + t`` whose output predicts ``targets[i]``, and
    ``sequence[i]`` the sequence it belongs to (the row, unless several sequences share a row). The model
    projects only these positions through its vocabulary (``model(ids, plan, select=index)``).
    """

    index: torch.Tensor  # [N] long
    targets: torch.Tensor  # [N] long
    sequence: torch.Tensor  # [N] long

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ScoredTokens:
        moved = (t.to(device, non_blocking=non_blocking) for t in (self.index, self.targets, self.sequence))
        return ScoredTokens(*moved)


def scored_tokens(input_ids: torch.Tensor, mask: torch.Tensor) -> ScoredTokens:
    """The one place of the causal shift: token t + 1 of a row is predicted from position t.

    ``mask`` is aligned with the tokens (``mask[b, t] == 1``: token t of row b is scored); token 0 has no
    prediction and is never scored. Reads the mask on the host (call it where batches are built).
    """
    if input_ids.dim() != 2 or mask.shape != input_ids.shape:
        raise Gpt2ChatError(
            f"scored_tokens: expected input_ids and mask [B, T], got {tuple(input_ids.shape)}, {tuple(mask.shape)}"
        )
    width = input_ids.shape[1]
    rows, t = mask[:, 1:].bool().nonzero(as_tuple=True)  # target (row, t + 1) <- predictor (row, t)
    return ScoredTokens(rows * width + t, input_ids[rows, t + 1], rows)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under each row of ``logits`` ([N, V] -> [N], float32): the one log-probability primitive.

    Half-precision logits are scored in float32 (a bf16 ``logsumexp`` of ~11 is rounded to steps of 1/16 nat).
    """
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sum_per_sequence(values: torch.Tensor, sequence: torch.Tensor, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of per-token ``values`` and how many tokens each sequence has ([S], [S])."""
    sums = torch.zeros(n_sequences, device=values.device, dtype=values.dtype).index_add(0, sequence, values)
    counts = torch.zeros(n_sequences, device=sequence.device, dtype=torch.long)
    return sums, counts.index_add(0, sequence, torch.ones_like(sequence))


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(labels[t] | tokens < t) over the masked tokens of each row, and how many there are.

    ``logits[:, t]`` scores ``labels[:, t + 1]``, weighted by ``mask[:, t + 1]`` (``mask`` is aligned with
    ``labels``, see the module docstring); labels under a zero mask may hold anything (e.g. -100 or padding).
    Only the scored positions' logits are normalised (:func:`scored_tokens`, :func:`token_logps`).

    Args:
        logits: ``[B, T, V]`` unnormalised next-token scores.
        labels: ``[B, T]`` token ids (usually the ``input_ids`` themselves).
        mask: ``[B, T]`` 1 / True where the token is scored.

    Returns:
        ``(sum_logps [B] float32, token_counts [B] int64)``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise Gpt2ChatError(
            "sequence_logps: expected logits [B, T, V] with labels and mask [B, T], got "
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, mask {tuple(mask.shape)}"
        )
    scored = scored_tokens(labels, mask)
    logps = token_logps(logits.flatten(0, 1).index_select(0, scored.index), scored.targets)
    return sum_per_sequence(logps, scored.sequence, logits.shape[0])


def sft_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
    num_items: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Supervised fine-tuning: mean cross-entropy over the assistant tokens of the whole batch.

    The standard causal-LM objective ``-1/N * sum_{t in assistant} log p(x_t | x_<t)`` (e.g. Ouyang et
    al. 2022, "Training language models to follow instructions with human feedback", the SFT stage),
    averaged per token over the batch like TRL's ``SFTTrainer`` with ``assistant_only_loss`` /
    ``completion_only_loss`` (long replies weigh more than short ones, padding weighs nothing).

    Two ways to call it, as ``F.cross_entropy`` takes either layout:
        ``sft_loss(logits [B, T, V], input_ids [B, T], assistant_mask [B, T])``: the model's output on
        whole rows (shifted here); or ``sft_loss(logits [N, V], targets [N])``: the logits of the N
        positions that predict the scored tokens, already selected (``ScoredTokens``), no mask.

    Args:
        num_items: divide by this many tokens instead of the batch's own count: the total over all
            gradient-accumulation micro-batches (and ranks), so that accumulated gradients equal those of
            one big batch. A micro-batch without assistant tokens then simply contributes 0.

    Raises:
        Gpt2ChatError: the mask selects no token and no ``num_items`` is given (the loss would be 0 / 0).
    """
    if num_items is not None and num_items <= 0:
        raise Gpt2ChatError(f"sft_loss: num_items must be > 0, got {num_items}")
    if mask is not None:
        if logits.dim() != 3 or tokens.shape != logits.shape[:2] or mask.shape != tokens.shape:
            raise Gpt2ChatError(
                "sft_loss: expected logits [B, T, V] with input_ids and mask [B, T], got "
                f"{tuple(logits.shape)}, {tuple(tokens.shape)}, {tuple(mask.shape)}"
            )
        scored = scored_tokens(tokens, mask)
        logits, tokens = logits.flatten(0, 1).index_select(0, scored.index), scored.targets
    elif logits.dim() != 2 or tokens.shape != logits.shape[:1]:
        raise Gpt2ChatError(
            f"sft_loss: without a mask, expected logits [N, V] and targets [N], got "
            f"{tuple(logits.shape)}, {tuple(tokens.shape)}"
        )
    n_tokens = tokens.numel()
    if n_tokens == 0 and num_items is None:
        raise Gpt2ChatError(
            "sft_loss: the assistant mask selects no token in this batch (nothing to train on); "
            "check the template's assistant_mask or the truncation length"
        )
    total = -token_logps(logits, tokens).sum()
    loss = total / (n_tokens if num_items is None else num_items)
    token_nll = (total / max(n_tokens, 1)).detach()
    metrics = {"loss": token_nll, "n_tokens": torch.tensor(n_tokens), "ppl": token_nll.exp()}
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization, sigmoid loss (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7).

    ``L = -mean log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])``

    All inputs are ``[B]`` log-probabilities **summed** over the reply tokens (:func:`sequence_logps`).
    The implicit rewards ``beta * (log pi - log ref)`` (Section 5 of the paper) are logged as
    ``rewards/chosen`` / ``rewards/rejected`` (batch means), ``rewards/margins`` their difference and
    ``rewards/accuracies`` the fraction of pairs whose chosen reward is higher.

    Raises:
        Gpt2ChatError: ``beta <= 0`` or inputs of different shapes.
    """
    _check_beta(beta, "dpo_loss")
    _check_same_shape(
        "dpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }
    return loss, metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): ``log1p(-exp(x))`` below ``-ln 2``, ``log(-expm1(x))`` above it."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_nll: torch.Tensor,
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7).

    ``L = L_SFT + beta * mean(-log sigmoid(log odds(y_w|x) - log odds(y_l|x)))`` with
    ``odds(y|x) = P(y|x) / (1 - P(y|x))`` and ``log P(y|x)`` the **average** per-token log-probability of
    the reply (Eq. 3, length-normalised). The log odds are
    ``log p - log(1 - p) = avg_logp - log1mexp(avg_logp)``, computed without leaving log space.

    Args:
        chosen_nll: the SFT term ``L_SFT`` on the chosen replies: a scalar (already averaged) or ``[B]``
            (averaged here). The caller chooses what it covers: the paper scores the reply only; TRL's
            ``ORPOTrainer`` scores prompt + reply.
        chosen_avg_logps, rejected_avg_logps: ``[B]`` mean per-token log-probs of the replies (< 0).
        beta: weight of the odds-ratio term (the paper's lambda).

    Typical inputs from one forward pass over ``[chosen rows; rejected rows]`` (n pairs)::

        sums, counts = sequence_logps(logits, input_ids, reply_mask)
        avg = sums / counts
        chosen_nll = -sums[:n].sum() / counts[:n].sum()      # the paper: reply tokens only

    Metrics (TRL's names): ``log_odds_ratio`` is the batch mean of ``log sigmoid(log odds ratio)`` and
    ``log_odds_chosen`` the batch mean of the log odds ratio itself; ``rewards/*`` are
    ``beta * avg_logps``.

    Raises:
        Gpt2ChatError: ``beta <= 0`` or inputs of different shapes.
    """
    _check_beta(beta, "orpo_loss")
    _check_same_shape("orpo_loss", chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    chosen = chosen_avg_logps.float().clamp(max=_MAX_AVG_LOGP)
    rejected = rejected_avg_logps.float().clamp(max=_MAX_AVG_LOGP)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    nll = chosen_nll.float().mean()
    loss = nll - beta * log_sigmoid_odds.mean()

    chosen_rewards = beta * chosen_avg_logps.detach().float()
    rejected_rewards = beta * rejected_avg_logps.detach().float()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_avg_logps.detach().float().mean(),
        "logps/rejected": rejected_avg_logps.detach().float().mean(),
        "nll_loss": nll.detach(),
        "log_odds_ratio": log_sigmoid_odds.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
    }
    return loss, metrics
