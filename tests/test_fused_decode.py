"""The native decode step (gpt2chat/fused_decode.py, kernels/csrc/decode.cpp) against the module path it
replaces: logits and KV-cache contents after one step for every weight format, rows at different lengths,
greedy tokens over 32 steps, both engines with the fast path on and off; and every condition that sends a
forward back to the module path."""

from __future__ import annotations

import pytest
import torch

from gpt2chat import fused_decode, kernels
from gpt2chat.attention_plan import AttentionPlan
from gpt2chat.config import get_preset
from gpt2chat.engine import BatchedEngine, Engine
from gpt2chat.engine.model_runner import ModelRunner, PrefillChunk
from gpt2chat.kv_cache import KVCache
from gpt2chat.model import GPT
from gpt2chat.quantize import Int8Linear, convert_for_inference
from gpt2chat.sampling import SamplingParams

if kernels.load() != "native":
    pytest.skip("the native kernels are not available here: the fast path is never taken", allow_module_level=True)

ARCHS = {
    "tiny": get_preset("tiny", vocab_size=1000),  # 64 wide, 4 heads of 16, 256 positions
    # 124M widths (768, 12 heads of 64, 3072 inner, 1024 positions), two layers and a small head
    "124m": get_preset("gpt2", n_layer=2, vocab_size=2048),
    # widths that are no multiple of the 8-float vectors: head_dim 12, 60 features, 240 inner
    "odd": get_preset("tiny", n_embd=60, n_head=5, n_positions=64, vocab_size=300),
}
# relative error of a row's logits against the module path's: the projections are the same kernels, so only
# LayerNorm / attention / GELU's order of fp32 rounding differs (~1e-7). int8 / int4 round the activations to
# int8 blocks, which now and then turns such a difference into one level of one block (measured: 0-2 rows in
# 16 at 1e-3 .. 1e-2, the rest ~1e-7): for them most rows must still agree to ROW and every row to FLIP, the
# order of their own error against fp32 (2.3% / 26%); a wrong key, position or weight is off by far more.
# "int8-exact" (fp32 activations, no rounding) holds every row to ROW.
ROW, FLIP = 1e-5, 5e-2
FORMATS = [None, "fp16", "int8", "int8-exact", "int4"]
TOLERANCE = {None: ROW, "fp16": ROW, "int8": FLIP, "int8-exact": ROW, "int4": FLIP}
_models: dict = {}


def _base(arch: str) -> GPT:
    """A GPT with every tensor random (biases and LayerNorms too: the init's zeros / ones hide mistakes), its
    matrices 5x GPT-2's init so that greedy decoding does not settle on one token at once."""
    if arch not in _models:
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = GPT(ARCHS[arch]).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.mul_(5)
                elif name.endswith("weight"):  # the LayerNorms
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        _models[arch] = model
    return _models[arch]


def _converted(arch: str, fmt: str | None) -> GPT:
    key = (arch, fmt)
    if key not in _models:
        model = convert_for_inference(_base(arch), "int8" if fmt == "int8-exact" else fmt)
        for module in model.modules():
            if isinstance(module, Int8Linear):
                module.exact_activations = fmt == "int8-exact"
        _models[key] = model
    return _models[key]


def _random_cache(config, rows: int, max_len: int, seed: int) -> KVCache:
    cache = KVCache(config, rows, max_len)
    generator = torch.Generator().manual_seed(seed)
    for tensor in cache.k + cache.v:
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return cache


def _clone(cache: KVCache) -> KVCache:
    twin = KVCache.__new__(KVCache)
    twin.k, twin.v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    twin.batch_size, twin.max_len = cache.batch_size, cache.max_len
    return twin


def _step(model, cache, ids, lengths, rows, first_row, fused: bool, monkeypatch):
    """Logits [B, V] of one decode step through the model's forward, the fast path on or off (and checked
    to be the path that ran)."""
    monkeypatch.setenv(fused_decode.FUSED_ENV, "1" if fused else "0")
    ran = []
    real = fused_decode.hidden_states
    monkeypatch.setattr(fused_decode, "hidden_states", lambda *args: ran.append(real(*args)) or ran[-1])
    plan = AttentionPlan.for_cache(model.config, cache, lengths, 1, rows=rows, first_row=first_row)
    with torch.inference_mode():
        logits = model(ids, plan)[:, -1]
    monkeypatch.setattr(fused_decode, "hidden_states", real)
    assert len(ran) == 1 and (ran[0] is not None) == fused
    return logits


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


CASES = [  # (arch, batch rows, how the lengths are chosen, cache rows: "first" = a slice from row 2, "perm")
    ("tiny", 1, "last", "first"), ("tiny", 3, "spread", "perm"), ("tiny", 16, "spread", "first"),
    ("tiny", 16, "equal", "first"), ("124m", 1, "last", "first"), ("124m", 3, "spread", "perm"),
    ("124m", 16, "short", "first"), ("odd", 3, "spread", "perm"), ("odd", 1, "first", "first"),
]  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f or "fp32")
@pytest.mark.parametrize("arch,batch,lengths,placement", CASES)
def test_step_matches_module_path(arch, batch, lengths, placement, fmt, monkeypatch):
    model = _converted(arch, fmt)
    config = model.config
    generator = torch.Generator().manual_seed(batch)
    max_len = 128 if lengths == "short" else config.n_positions
    top = max_len - 1  # the last position a step can write
    if lengths == "last":
        filled = [top]
    elif lengths == "first":
        filled = [0]
    elif lengths == "equal":
        filled = [37] * batch
    else:  # both ends and random ones between
        filled = [0, top, *torch.randint(1, top, (batch - 2,), generator=generator).tolist()][:batch]
        if batch == 16:
            filled[5] = 1
    cache_rows = batch + 2
    rows, first_row = (None, 2) if placement == "first" else (torch.randperm(cache_rows, generator=generator)[:batch].tolist(), 0)
    ids = torch.randint(0, config.vocab_size, (batch, 1), generator=generator)
    module_cache = _random_cache(config, cache_rows, max_len, seed=batch)
    fused_cache = _clone(module_cache)
    expected = _step(model, module_cache, ids, filled, rows, first_row, False, monkeypatch)
    got = _step(model, fused_cache, ids, filled, rows, first_row, True, monkeypatch)
    assert got.shape == expected.shape == (batch, config.vocab_size)
    rows_error = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).sort().values
    assert rows_error[-1] <= TOLERANCE[fmt]
    if batch > 1:
        assert rows_error[(batch - 1) // 2] <= ROW
    written = torch.zeros(cache_rows, max_len, dtype=torch.bool)
    written[torch.tensor(rows) if rows is not None else torch.arange(first_row, first_row + batch), filled] = True
    before = _random_cache(config, cache_rows, max_len, seed=batch)
    for theirs, ours, old in zip(module_cache.k + module_cache.v, fused_cache.k + fused_cache.v,
                                 before.k + before.v, strict=True):  # fmt: skip
        ours, theirs, old = (t.transpose(1, 2) for t in (ours, theirs, old))  # [rows, positions, H, D]
        assert torch.equal(ours[~written], old[~written])  # nothing else touched, bit for bit
        assert not torch.equal(ours[written], old[written])
        assert _relative(ours[written], theirs[written]) <= TOLERANCE[fmt]


@pytest.mark.parametrize("arch", ["tiny", "124m"])
def test_greedy_tokens_of_fp32_unchanged(arch, monkeypatch):
    model = _converted(arch, None)
    prompts = [[5, 17, 3, 99], [42] * 11, [7]]

    def greedy(fused: bool) -> list[list[int]]:
        monkeypatch.setenv(fused_decode.FUSED_ENV, "1" if fused else "0")
        runner = ModelRunner(model, max_rows=3, max_len=64)
        runner.reserve(3, 64)
        logits = runner.prefill([PrefillChunk(row, 0, p) for row, p in enumerate(prompts)])
        tokens = [[int(x[-1].argmax())] for x in logits]
        lengths = [len(p) for p in prompts]
        for _ in range(31):
            step = runner.decode([t[-1] for t in tokens], lengths)
            lengths = [n + 1 for n in lengths]
            for row, t in enumerate(tokens):
                t.append(int(step[row].argmax()))
        return tokens

    off, on = greedy(False), greedy(True)
    assert on == off
    assert all(len(set(t)) >= 3 for t in on)  # greedy did not settle on one token (that would prove little)


@pytest.mark.parametrize("fmt", [None, "int8"], ids=lambda f: f or "fp32")
@pytest.mark.parametrize("engine_class", [Engine, BatchedEngine])
def test_engines_give_the_same_tokens_and_logprobs(engine_class, fmt, monkeypatch):
    model = _converted("tiny", fmt)
    prompts = [[464, 2, 758, 21], [40, 110], [15, 11, 995, 0, 314, 716, 257, 132, 13, 50, 198]]
    params = [SamplingParams(temperature=0, max_new_tokens=20, logprobs=3),
              SamplingParams(temperature=0.8, top_k=20, seed=7, max_new_tokens=20, logprobs=1),
              SamplingParams(temperature=0, max_new_tokens=12, logprobs=0)]  # fmt: skip
    taken = []
    real = fused_decode.hidden_states

    def spy(*args):
        out = real(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(fused_decode, "hidden_states", spy)

    def run(fused: bool):
        monkeypatch.setenv(fused_decode.FUSED_ENV, "1" if fused else "0")
        engine = engine_class(model, max_batch_size=4)
        try:
            return engine.generate(prompts, params)
        finally:
            if hasattr(engine, "close"):
                engine.close()

    off = run(False)
    assert not any(taken)
    on = run(True)
    assert sum(taken) >= 19  # every decode step of the second run was the native one
    for a, b in zip(off, on, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert [t.token_id for t in b.logprobs] == [t.token_id for t in a.logprobs]
        assert [t.logprob for t in b.logprobs] == pytest.approx([t.logprob for t in a.logprobs], abs=1e-4)
        assert [[i for i, _ in t.top] for t in b.logprobs] == [[i for i, _ in t.top] for t in a.logprobs]


# ----------------------------------------------------------------------------------- the module path
def _decode_plan(model, rows=2, filled=(3, 5)):
    cache = _random_cache(model.config, rows, 32, seed=1)
    return AttentionPlan.for_cache(model.config, cache, list(filled), 1)


def _ids(model, rows=2, length=1):
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(3))


def test_what_takes_the_module_path(monkeypatch):
    model = _converted("tiny", "int8")
    ids, plan = _ids(model), _decode_plan(model)
    with torch.inference_mode():
        assert fused_decode.hidden_states(model, ids, plan) is not None  # the baseline: native
        cache = _random_cache(model.config, 2, 32, seed=1)
        assert fused_decode.hidden_states(model, _ids(model, length=4), AttentionPlan.for_cache(
            model.config, cache, [3, 5], 4)) is None  # a T > 1 chunk  # fmt: skip
        assert fused_decode.hidden_states(model, ids, None) is None  # no cache
        static = AttentionPlan.for_decode(model.config, cache, torch.tensor([3, 5]), 16)
        assert fused_decode.hidden_states(model, ids, static) is None  # the compiled step's static plan
        ragged = AttentionPlan.for_ragged_cache(model.config, cache, [0, 1], [3, 5], [1, 1])
        assert fused_decode.hidden_states(model, ids.view(1, 2), ragged) is None
        for off in ("0", "false", "OFF"):
            monkeypatch.setenv(fused_decode.FUSED_ENV, off)
            assert fused_decode.hidden_states(model, ids, plan) is None
        monkeypatch.delenv(fused_decode.FUSED_ENV)
        assert fused_decode.hidden_states(model, ids, plan) is not None
    assert torch.is_grad_enabled()
    assert fused_decode.hidden_states(model, ids, plan) is None  # gradients on
    model.train()
    try:
        with torch.inference_mode():
            assert fused_decode.hidden_states(model, ids, plan) is None  # training
    finally:
        model.eval()


@pytest.mark.parametrize("preset", ["tiny-neo", "plain", "lora"])
def test_models_the_native_step_cannot_run(preset):
    from gpt2chat.lora import LoRALinear

    if preset == "tiny-neo":
        model, reason = convert_for_inference(GPT(get_preset("tiny-neo", vocab_size=300)).eval()), "GPT-Neo"
    elif preset == "plain":
        model, reason = _base("tiny"), "is a Linear"
    else:
        model = convert_for_inference(_base("tiny"))
        wrapped = LoRALinear(model.transformer.h[1].mlp.c_fc, r=2, scaling=1.0)
        torch.nn.init.normal_(wrapped.lora_B.weight)
        model.transformer.h[1].mlp.c_fc = wrapped
        reason = "transformer.h.1.mlp.c_fc is a LoRALinear"
    assert reason in fused_decode.why_not(model)
    with torch.inference_mode():
        assert fused_decode.hidden_states(model, _ids(model), _decode_plan(model)) is None
        logits = model(_ids(model), _decode_plan(model))  # and the module path runs
    assert logits.shape == (2, 1, model.config.vocab_size)


def test_portable_backend_takes_the_module_path(monkeypatch):
    model = convert_for_inference(_base("tiny"))
    monkeypatch.setattr(kernels, "load", lambda: "portable")
    assert fused_decode.why_not(model) == "the native CPU kernels are not loaded"
    with torch.inference_mode():
        assert fused_decode.hidden_states(model, _ids(model), _decode_plan(model)) is None


def test_forward_hooks_take_the_module_path():
    model = convert_for_inference(_base("tiny"))
    seen = []
    model.transformer.h[0].register_forward_hook(lambda *args: seen.append(1))
    assert "transformer.h.0 has forward hooks" in fused_decode.why_not(model)
    with torch.inference_mode():
        model(_ids(model), _decode_plan(model))
    assert seen == [1]


# ----------------------------------------------------------------------------------- gathered once
def test_weights_gathered_once_and_again_after_a_change(monkeypatch):
    model = convert_for_inference(_base("tiny"), "int8")
    first = fused_decode.decode_weights(model)
    assert fused_decode.decode_weights(model) is first  # not gathered per step

    def agree() -> None:
        cache = _random_cache(model.config, 2, 32, seed=4)
        twin = _clone(cache)
        ids = _ids(model)
        expected = _step(model, cache, ids, [3, 5], None, 0, False, monkeypatch)
        assert _relative(_step(model, twin, ids, [3, 5], None, 0, True, monkeypatch), expected) <= 1e-4

    # a plain attribute that picks the kernel: the int8 modules' exact_activations
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.exact_activations = True
    assert fused_decode.decode_weights(model) is not first
    assert set(fused_decode.decode_weights(model).formats) == {fused_decode.I8}
    agree()
    # a projection replaced (e.g. quantized again in place): a registration, so gathered again
    before = fused_decode.decode_weights(model)
    fc = model.transformer.h[0].mlp.c_fc
    model.transformer.h[0].mlp.c_fc = Int8Linear(torch.randn(fc.out_features, fc.in_features), torch.randn(fc.out_features))
    assert fused_decode.decode_weights(model) is not before
    agree()


def test_in_place_weight_changes_need_no_new_gathering(monkeypatch):
    model = convert_for_inference(_base("tiny"))
    gathered = fused_decode.decode_weights(model)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # copies into the same tensors
    assert fused_decode.decode_weights(model) is gathered
    cache = _random_cache(model.config, 2, 32, seed=6)
    twin = _clone(cache)
    ids = _ids(model)
    expected = _step(model, cache, ids, [3, 5], None, 0, False, monkeypatch)
    assert _relative(_step(model, twin, ids, [3, 5], None, 0, True, monkeypatch), expected) <= 1e-5


def test_a_copy_gathers_its_own():
    import copy

    model = convert_for_inference(_base("tiny"))
    gathered = fused_decode.decode_weights(model)
    twin = copy.deepcopy(model)
    assert fused_decode.decode_weights(twin) is not gathered
    assert fused_decode.decode_weights(twin).tensors[0] is twin.transformer.h[0].ln_1.weight


def test_bad_arguments_get_a_clear_error():
    model = convert_for_inference(_base("tiny"))
    weights = fused_decode.decode_weights(model)
    cache = _random_cache(model.config, 2, 32, seed=1)

    def call(**change):
        args = dict(ids=torch.tensor([[7]]), wte=weights.wte, wte_format=weights.wte_format, vocab=weights.vocab,
                    wpe=weights.wpe, positions=torch.tensor([[3]]), rows=None, first_row=0, keys=cache.k,
                    values=cache.v, weights=weights.tensors, formats=weights.formats, n_head=weights.n_head,
                    inner=weights.inner, eps=weights.eps)  # fmt: skip
        args.update(change)
        return torch.ops.gpt2chat.decode_step(**args)

    with pytest.raises(RuntimeError, match="position 32 of row 0 is outside the cache"):
        call(positions=torch.tensor([[32]]))
    with pytest.raises(RuntimeError, match="cache row 2 of batch row 0 is outside the cache's 2 rows"):
        call(first_row=2)
    with pytest.raises(RuntimeError, match=r"token id 1000 of row 0 is outside the vocabulary \(1000\)"):
        call(ids=torch.tensor([[1000]]))
    with pytest.raises(RuntimeError, match="expected 34 weight tensors"):
        call(weights=weights.tensors[:-1])
    with pytest.raises(RuntimeError, match="unknown weight format 9"):
        call(formats=[9] * len(weights.formats))
    assert torch.equal(cache.k[0], _random_cache(model.config, 2, 32, seed=1).k[0])  # no failed call wrote
    assert call().shape == (1, 1, model.config.n_embd)
