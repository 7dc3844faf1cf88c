"""Logits -> next token: logit bias, grammar masks, greedy, temperature, top-k, top-p and repetition penalty.

Pure tensor functions with the semantics of `transformers`' logits processors, applied in the order
`generate` applies them: repetition penalty (over prompt + generated tokens), temperature, top-k, top-p,
then a draw. Temperature 0 means greedy: argmax of the (penalised) logits.

Before those, two restrictions a row may carry (`sample_next` applies them, so every caller shares them):
OpenAI's `logit_bias` (added to the row's logits, -100 .. 100) and a grammar (`gpt2chat.grammar`): tokens
the row's `ConstraintState` does not allow are set to -inf, and the state advances with the token drawn.
Rows with and without either share one call; a row's restriction touches no other row.

Several rows are sampled at once, each with its own `SamplingParams`, which is what the engine needs when
requests with different settings share one decode step. The random part (each row's uniform, seeded or
not, and the inverse-CDF draws it drives) is `gpt2chat.token_draw`.

The draw is cheap because it never touches the whole vocabulary more than it must: top-k and top-p keep
their candidates with `torch.topk` (no sort of 50k scores, no float64 copy of them) and one uniform per row
inverts the candidates' cumulative sum; a row with neither draws from the whole vocabulary in two levels.
The distribution is the one `transformers`' processors give (tested); the tokens are not those of its
`torch.multinomial`, which draws one exponential per vocabulary entry (~1 ms a row on a CPU, 17 ms for 16
rows).

This module knows nothing about models, caches or requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.token_draw import inverse_cdf_draw, row_uniforms, vocabulary_draw

if TYPE_CHECKING:
    import torch

    from gpt2chat.grammar import Constraint

__all__ = [
    "SamplingParams",
    "SAMPLING_PRESETS",
    "get_preset",
    "sample_next",
    "process_logits",
    "MAX_LOGPROBS",
]


MAX_LOGPROBS = 20  # most alternatives a logprobs entry lists (OpenAI's limit for top_logprobs)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for one logit_bias value: -100 (never) .. 100 (always)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's choice too)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; checked on construction (bad values raise `Gpt2ChatError`)."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in prompt or reply
    stop_token_ids: tuple[int, ...] = field(default=())
    seed: int | None = None
    # log-probabilities of the model's raw distribution (before penalty, temperature, top-k / top-p):
    # None = off, 0 = the chosen token's only, k = also the k most likely tokens (k <= MAX_LOGPROBS)
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt position after the first
    # (token_id, bias) pairs added to the logits before anything else (a {id: bias} mapping is taken too)
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    # the grammar the reply must match (gpt2chat.grammar.Constraint); each request row starts its own state
    constraint: Constraint | None = None

    def __post_init__(self):
        def bad(name: str, rule: str):
            raise Gpt2ChatError(f"sampling parameter {name}={getattr(self, name)!r}: must be {rule}")

        if not _is_number(self.temperature) or self.temperature < 0:
            bad("temperature", "a number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number with 0 < top_p <= 1")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0 (1 = off)")
        if (
            not isinstance(self.max_new_tokens, int)
            or isinstance(self.max_new_tokens, bool)
            or self.max_new_tokens < 1
        ):
            bad("max_new_tokens", "an integer >= 1")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "an integer or None")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS
            ):
                bad(name, f"None or an integer from 0 to {MAX_LOGPROBS}")
        try:
            stops = tuple(int(t) for t in self.stop_token_ids)
        except (TypeError, ValueError):
            bad("stop_token_ids", "a sequence of token ids")
        if any(t < 0 for t in stops):
            bad("stop_token_ids", "non-negative token ids")
        bias = self.logit_bias
        pairs = bias.items() if isinstance(bias, dict) else bias
        try:
            pairs = tuple((int(t), float(b)) for t, b in pairs)
        except (TypeError, ValueError):
            bad("logit_bias", "a mapping of token ids to numbers")
        if any(t < 0 or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in pairs):
            bad("logit_bias", f"token ids >= 0 mapped to numbers from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}")
        object.__setattr__(self, "logit_bias", pairs)
        if self.constraint is not None and not hasattr(self.constraint, "start"):
            bad("constraint", "None or a gpt2chat.grammar.Constraint")
        object.__setattr__(self, "stop_token_ids", stops)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))

    @property
    def greedy(self) -> bool:
        # below GREEDY_BELOW the draw is the argmax anyway, and logits / temperature would overflow to inf
        # (then NaN probabilities) for temperatures as small as 1e-40, which OpenAI's 0..2 range admits
        return self.temperature < GREEDY_BELOW

    def replace(self, **changes) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        from dataclasses import replace

        return replace(self, **changes)


SAMPLING_PRESETS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(temperature=0.0),
    # the chat default; seed 004's final choice for its GPT-Neo chatbot (temperature .9, top_k 30, top_p .95)
    "chat": SamplingParams(temperature=0.9, top_k=30, top_p=0.95),
    # a narrower nucleus; seed 001's settings (top_k 35, top_p .80 at temperature 1)
    "focused": SamplingParams(temperature=1.0, top_k=35, top_p=0.80),
}


def get_preset(name: str) -> SamplingParams:
    try:
        return SAMPLING_PRESETS[name]
    except KeyError:
        raise Gpt2ChatError(
            f"unknown sampling preset {name!r}; choose one of {', '.join(sorted(SAMPLING_PRESETS))}"
        ) from None


def _seen_mask(seen, batch: int, vocab: int, device) -> torch.Tensor | None:
    """Presence mask [B, V] of the tokens the repetition penalty applies to."""
    import torch

    if seen is None:
        return None
    if isinstance(seen, torch.Tensor) and seen.dtype == torch.bool:
        return seen
    mask = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
    if isinstance(seen, torch.Tensor):
        ids = seen.to(device=device, dtype=torch.long)
        # negative ids are padding; ids beyond the vocabulary cannot be generated: both go to the spare column
        ids = torch.where((ids < 0) | (ids >= vocab), vocab, ids)
        mask.scatter_(1, ids, True)
    else:
        for row, ids in enumerate(seen):
            ids = [i for i in ids if 0 <= i < vocab]
            if ids:
                mask[row, ids] = True
    return mask[:, :vocab]


def _rows(params, batch: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * batch
    params = list(params)
    if len(params) != batch:
        raise ValueError(f"got {len(params)} SamplingParams for {batch} rows")
    return params


def _apply_repetition_penalty(logits, seen_mask, penalties) -> torch.Tensor:
    import torch

    if isinstance(penalties, float):
        penalty = penalties
    else:
        penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen_mask, penalised, logits)


_FIRST_NUCLEUS = 64  # candidates a top-p-only row starts from on a CPU (then 16x that, then a sort)


def _penalised(logits, seen, rows: list[SamplingParams]) -> torch.Tensor:
    """`logits` [B, V] as float32, with each row's repetition penalty over the tokens `seen` marks."""
    scores = logits.float()
    penalties = [p.repetition_penalty for p in rows]
    if seen is None or all(p == 1.0 for p in penalties):
        return scores
    mask = _seen_mask(seen, *logits.shape, logits.device)
    return _apply_repetition_penalty(scores, mask, penalties[0] if len(set(penalties)) == 1 else penalties)


def _groups(rows: list[SamplingParams]) -> dict[tuple, list[int]]:
    """The sampled (not greedy) rows by (temperature, top_k, top_p): one pass of work per setting, not per row."""
    groups: dict[tuple, list[int]] = {}
    for row, p in enumerate(rows):
        if not p.greedy:
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
    return groups


def _candidates(scores, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (min_tokens_to_keep=1) keep
    of each row of `scores` [n, V] (rows sharing these settings) -> (the kept tokens' scores divided by the
    temperature, most likely first, -inf past a row's last kept token [n, c]; their token ids [n, c]), or
    None when neither top-k nor top-p applies (every token is kept).

    The vocabulary is never sorted on a CPU: top-k takes `torch.topk` of k (+1 to see a tie at the k-th
    score, which HF keeps: then every tied token), top-p alone takes the top 64, then 1024, until they hold
    `top_p` of the mass (else one sort). On another device the candidates are one sort (no count read back)."""
    import torch

    vocab = scores.size(-1)
    k = top_k if 0 < top_k < vocab else 0
    if not k and top_p >= 1.0:
        return None
    on_cpu = scores.device.type == "cpu"
    if k:
        if on_cpu:
            values, ids = torch.topk(scores, k + 1)
            values = values / temperature
            kth = values[:, k - 1 : k]
            if bool(((values[:, k:] == kth) & (kth > -math.inf)).any()):
                # ties at the k-th score: HF keeps every one of them
                keep = int((scores / temperature >= kth).sum(-1).max())
                values, ids = torch.topk(scores, keep)
                values = values / temperature
            else:
                values, ids = values[:, :k], ids[:, :k]
        else:
            values, ids = torch.sort(scores / temperature, descending=True)
            kth = values[:, k - 1 : k]
        values = values.masked_fill(values < kth, -math.inf)
        if top_p >= 1.0:
            return values, ids
        total = None  # top-p renormalises over the top-k survivors
    else:
        scaled = scores / temperature
        total = torch.logsumexp(scaled, dim=-1, keepdim=True)
        if not on_cpu:
            return _nucleus(*torch.sort(scaled, descending=True), top_p, total)[:2]
        for count in (_FIRST_NUCLEUS, 16 * _FIRST_NUCLEUS):
            if count < vocab:
                values, ids, covered = _nucleus(*torch.topk(scaled, count), top_p, total)
                if covered:
                    return values, ids
        # a flat row (its nucleus holds thousands of tokens): one sort beats a topk that large
        return _nucleus(*torch.sort(scaled, descending=True), top_p, total)[:2]
    return _nucleus(values, ids, top_p, total)[:2]


def _nucleus(values, ids, top_p: float, total) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Top-p on candidates `values` [n, c] (most likely first; `total`: each row's logsumexp over its whole
    row, or None when the candidates are the whole row) -> (values with the removed tokens -inf, ids,
    whether every row's nucleus ends inside the candidates, i.e. a token past them would be removed too).

    HF removes a token when the mass of the tokens less likely than it is <= 1 - top_p, i.e. when the mass
    of those more likely than it reaches top_p; the most likely token always stays. The masses are one
    sequential float64 cumsum, so a row's verdicts do not depend on how many candidates it was given."""
    import torch

    top = values[:, :1]
    weights = torch.exp(values - top).double()
    mass = weights.cumsum(dim=-1)
    whole = mass[:, -1:] if total is None else torch.exp(total - top).double()
    bound = top_p * whole
    remove = (mass - weights) >= bound
    remove[:, 0] = False
    covered = total is None or bool((mass[:, -1:] >= bound).all())
    return values.masked_fill(remove, -math.inf), ids, covered


def process_logits(logits, seen, params) -> torch.Tensor:
    """The scores the next token is drawn from: logits [B, V] after penalty, temperature, top-k, top-p.

    `seen`: the tokens the repetition penalty looks at (prompt + generated) as a bool mask [B, V], a
    LongTensor [B, L] (negative = padding) or a list of id lists; None when no penalty applies.
    `params`: one `SamplingParams` for all rows or one per row. Greedy rows get only the penalty.
    (The draw itself never builds these full rows: `sample_next` draws from the candidates.)
    """
    import torch

    rows = _rows(params, logits.size(0))
    scores = _penalised(logits, seen, rows)
    groups = _groups(rows)
    if not groups:
        return scores
    out = scores.clone()
    for (temperature, top_k, top_p), members in groups.items():
        index = torch.tensor(members, device=scores.device)
        part = scores.index_select(0, index)
        kept = _candidates(part, temperature, top_k, top_p)
        if kept is None:
            out[index] = part / temperature
        else:
            out[index] = torch.full_like(part, -math.inf).scatter_(1, kept[1], kept[0])
    return out


def _bias_rows(scores, rows: list[SamplingParams]) -> torch.Tensor:
    """`scores` [B, V] float with each row's logit_bias added (ids past the vocabulary cannot be drawn)."""
    import torch

    vocab = scores.size(-1)
    row_ids, token_ids, values = [], [], []
    for row, p in enumerate(rows):
        for token, value in p.logit_bias:
            if token < vocab:
                row_ids.append(row)
                token_ids.append(token)
                values.append(value)
    if not row_ids:
        return scores
    device = scores.device
    index = (torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device))
    return scores.index_put(index, torch.tensor(values, dtype=scores.dtype, device=device), accumulate=True)


def restrict_logits(logits, rows: list[SamplingParams], constraints) -> torch.Tensor:
    """Logits [B, V] after each row's logit_bias and grammar mask (the input itself when no row has one).

    `constraints`: None or one `ConstraintState` (or None) per row."""
    import torch

    constrained = [] if constraints is None else [row for row, state in enumerate(constraints) if state is not None]
    if not constrained and not any(p.logit_bias for p in rows):
        return logits
    scores = _bias_rows(logits.float(), rows)
    if constrained:
        from gpt2chat.grammar import grammar_masks

        allowed = grammar_masks([constraints[row] for row in constrained],
                                [rows[row].stop_token_ids for row in constrained], scores.size(-1), scores.device)
        if len(constrained) == scores.size(0):
            scores = scores.masked_fill(~allowed, -math.inf)
        else:
            index = torch.tensor(constrained, device=scores.device)
            scores = scores.index_copy(0, index, scores.index_select(0, index).masked_fill(~allowed, -math.inf))
    return scores


def sample_next(logits, seen, params, draws=None, constraints=None) -> torch.Tensor:
    """Pick the next token of each row: LongTensor [B] on the logits' device.

    logits: [B, V] for the last position. seen: what the repetition penalty looks at (see
    `process_logits`), or None. params: one `SamplingParams` or one per row. draws: the number of tokens
    each row has drawn before this one (an int64 tensor [B] or a list; default 0): with the row's seed it
    picks the row's uniform, so a seeded row is reproducible. constraints: None, or per row a
    `ConstraintState` (made by `params.constraint.start()` when the request starts) or None; each state
    is advanced with its row's token unless that token is one of the row's stop tokens. No host
    synchronisation on a GPU unless a row has a grammar (its state needs the token on the host).
    """
    rows = _rows(params, logits.size(0))
    next_ids = _draw(restrict_logits(logits, rows, constraints), seen, rows, draws)
    if constraints is not None and any(state is not None for state in constraints):
        tokens = next_ids.tolist()
        for state, token, p in zip(constraints, tokens, rows, strict=True):
            if state is not None and token not in p.stop_token_ids:
                state.advance(token)
    return next_ids


def _draw(logits, seen, rows: list[SamplingParams], draws) -> torch.Tensor:
    import torch

    needs_penalty = seen is not None and any(p.repetition_penalty != 1.0 for p in rows)
    if all(p.greedy for p in rows) and not needs_penalty:
        return logits.argmax(dim=-1)
    scores = _penalised(logits, seen, rows)
    groups = _groups(rows)
    if not groups:
        return scores.argmax(dim=-1)
    batch, device = scores.size(0), scores.device
    uniforms = row_uniforms([p.seed for p in rows], draws, device)
    next_ids = None
    for (temperature, top_k, top_p), members in groups.items():
        alone = len(members) == batch
        index = None if alone else torch.tensor(members, device=device)
        part, part_uniforms = (scores, uniforms) if alone else (scores.index_select(0, index), uniforms[index])
        kept = _candidates(part, temperature, top_k, top_p)
        if kept is None:
            tokens = vocabulary_draw(part / temperature, part_uniforms)
        else:
            values, ids = kept
            tokens = ids.gather(1, inverse_cdf_draw(values, part_uniforms)).squeeze(1)
        if alone:
            return tokens
        if next_ids is None:
            next_ids = scores.argmax(dim=-1)  # the greedy rows' tokens; the others' are replaced
        next_ids[index] = tokens
    return next_ids
