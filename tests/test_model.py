"""Our GPT-2 / GPT-Neo against transformers' on the same weights, the KV cache against full forwards,
packing and shared prefixes against separate forwards, and the attention plans' checks."""

from __future__ import annotations

import pytest
import torch

from gpt2chat.attention_plan import AttentionPlan, ContextLengthError
from gpt2chat.config import PRESETS, ConfigError, ModelConfig, get_preset
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.kv_cache import KVCache
from gpt2chat.model import GPT

transformers = pytest.importorskip("transformers")

VOCAB = 1000
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def make_model(preset: str = "tiny", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset(preset, vocab_size=VOCAB, **overrides)).eval()


def hf_twin(model: GPT):
    """A transformers model with exactly our weights (Conv1D transposed by hand, not by our loader)."""
    hf_config = transformers.AutoConfig.for_model(**model.config.to_hf_dict())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if model.config.model_type == "gpt2" and key.endswith(CONV1D_SUFFIXES):
            value = value.t()
        state[key] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.endswith((".attn.bias", "masked_bias", "lm_head.weight")) for k in missing), missing
    return hf


@pytest.mark.parametrize("preset", ["tiny", "tiny-neo"])
def test_logits_match_transformers(preset):
    model = make_model(preset)
    hf = hf_twin(model)
    ids = torch.randint(0, VOCAB, (2, 40))  # 40 > tiny-neo's window of 16: local layers matter
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (2, 40, VOCAB)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpt2", "gpt-neo-125m"])
def test_logits_match_transformers_full_size(preset):
    torch.manual_seed(0)
    model = GPT(get_preset(preset)).eval()
    hf = hf_twin(model)
    ids = torch.randint(0, 50257, (1, 300))  # past gpt-neo's 256 window
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_neo_local_window_changes_logits():
    """The window is real: the same weights with all-global layers give different late logits."""
    model = make_model("tiny-neo")
    global_model = GPT(model.config.replace(attention_layers=["global", "global"])).eval()
    global_model.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        local, everywhere = model(ids), global_model(ids)
    window = model.config.window_size
    assert torch.allclose(local[:, :window], everywhere[:, :window], atol=1e-5)
    assert not torch.allclose(local[:, window:], everywhere[:, window:], atol=1e-3)


def test_logits_to_keep():
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full, last = model(ids), model(ids, logits_to_keep=3)
    assert last.shape == (2, 3, VOCAB)
    assert torch.allclose(full[:, -3:], last, atol=1e-6)


def test_hidden_states_and_selected_positions_are_what_the_full_logits_hold():
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, 12))
    select = torch.tensor([3, 0, 23, 13])  # flat row * T + t, in any order
    with torch.no_grad():
        full = model(ids)
        hidden = model.hidden_states(ids)
        assert hidden.shape == (2, 12, model.config.n_embd)
        assert torch.allclose(model.lm_head(hidden), full, atol=1e-6)
        selected = model(ids, select=select)
    assert selected.shape == (4, VOCAB)
    assert torch.allclose(selected, full.flatten(0, 1)[select], atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model(ids, logits_to_keep=1, select=select)


# ---------------------------------------------------------------- KV cache
def cached(model, ids, cache, lengths, rows=None, **kwargs):
    """One forward appending `ids` to the cache rows at `lengths` (updated in place, as a caller does)."""
    plan = AttentionPlan.for_cache(model.config, cache, lengths, ids.shape[1], rows)
    out = model(ids, plan, **kwargs)
    for i in range(len(lengths)):
        lengths[i] += ids.shape[1]
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-neo"])
def test_incremental_decode_matches_full_forward(preset):
    model = make_model(preset)
    ids = torch.randint(0, VOCAB, (2, 45))
    lengths = [0, 0]
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(batch_size=2, max_len=64)
        steps = [cached(model, ids[:, :5], cache, lengths)]  # prefill
        steps.append(cached(model, ids[:, 5:9], cache, lengths))  # chunked prefill on a non-empty cache
        for t in range(9, 45):  # single tokens, well past the Neo window of 16
            steps.append(cached(model, ids[:, t : t + 1], cache, lengths))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("preset", ["tiny", "tiny-neo"])
def test_cache_rows_with_different_lengths(preset):
    model = make_model(preset)
    seqs = [torch.randint(0, VOCAB, (1, n)) for n in (30, 26, 24)]
    with torch.no_grad():
        full = [model(s) for s in seqs]
        cache = model.new_kv_cache(batch_size=3, max_len=40)
        prompt_lens = [7, 20, 3]
        for row, n in enumerate(prompt_lens):  # one prefill per row, through rows=
            out = cached(model, seqs[row][:, :n], cache, [0], rows=[row], logits_to_keep=1)
            assert torch.allclose(out[0, -1], full[row][0, n - 1], atol=1e-4)
        pos = list(prompt_lens)
        for _ in range(3):  # all rows at once, each at its own length
            step = torch.stack([seqs[r][0, pos[r]] for r in range(3)]).unsqueeze(1)
            before = list(pos)
            out = cached(model, step, cache, pos)
            for r in range(3):
                assert torch.allclose(out[r, 0], full[r][0, before[r]], atol=1e-4), (r, before[r])
        rows = [2, 0]  # a subset, out of order, two tokens each
        step = torch.stack([seqs[r][0, pos[r] : pos[r] + 2] for r in rows])
        out = cached(model, step, cache, [pos[r] for r in rows], rows=rows)
        for i, r in enumerate(rows):
            assert torch.allclose(out[i], full[r][0, pos[r] : pos[r] + 2], atol=1e-4)
        # the first rows of a larger cache, without rows=: the decode step of a batch that does not fill it
        step = torch.stack([seqs[r][0, pos[r] + 2 * (r != 1)] for r in range(2)]).unsqueeze(1)
        out = cached(model, step, cache, [pos[0] + 2, pos[1]])
        assert torch.allclose(out[0, 0], full[0][0, pos[0] + 2], atol=1e-4)
        assert torch.allclose(out[1, 0], full[1][0, pos[1]], atol=1e-4)


def test_right_padded_prefill_then_lower_lengths():
    """A right-padded batch prefilled at once, then each row continued from its real prompt length."""
    model = make_model()
    a, b = torch.randint(0, VOCAB, (1, 10)), torch.randint(0, VOCAB, (1, 6))
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], dim=1)])
    nxt = torch.randint(0, VOCAB, (2, 1))
    with torch.no_grad():
        cache = model.new_kv_cache(batch_size=2, max_len=32)
        cached(model, padded, cache, [0, 0])
        out = cached(model, nxt, cache, [10, 6])
        want_a = model(torch.cat([a, nxt[:1]], dim=1))[0, -1]
        want_b = model(torch.cat([b, nxt[1:]], dim=1))[0, -1]
    assert torch.allclose(out[0, 0], want_a, atol=1e-4)
    assert torch.allclose(out[1, 0], want_b, atol=1e-4)


def test_a_row_restarted_at_length_zero_forgets_its_old_entries():
    model = make_model()
    cache = model.new_kv_cache(batch_size=2, max_len=16)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        cached(model, ids, cache, [0, 0])
        out = cached(model, ids[1:, :3], cache, [0], rows=[1])
        assert torch.allclose(out, model(ids[1:, :3]), atol=1e-4)


def test_cache_full_and_context_limit_raise_clear_errors():
    model = make_model()
    cache = KVCache(model.config, batch_size=1, max_len=8)
    with pytest.raises(ContextLengthError, match="KV cache is full"):
        AttentionPlan.for_cache(model.config, cache, [6], 3)
    with pytest.raises(ContextLengthError, match="context is 256 tokens"):
        AttentionPlan.for_cache(model.config, model.new_kv_cache(1, 300), [250], 7)
    with pytest.raises(Gpt2ChatError, match="context is 256 tokens"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache has 1"):
        AttentionPlan.for_cache(model.config, cache, [0, 0], 1)


def test_a_plan_for_another_window_is_refused():
    neo = make_model("tiny-neo")
    plan = AttentionPlan.causal(make_model().config, 20)
    with pytest.raises(ValueError, match="local window None"):
        neo(torch.zeros(1, 20, dtype=torch.long), plan)


def test_a_decode_step_reads_nothing_back_from_the_device(monkeypatch):
    """The forward never turns a tensor into a Python value (on CUDA each would wait for the GPU)."""
    model = make_model("tiny-neo")
    cache = model.new_kv_cache(batch_size=2, max_len=64)
    with torch.no_grad():
        cached(model, torch.randint(0, VOCAB, (2, 30)), cache, [0, 0])
        plans = [AttentionPlan.for_cache(model.config, cache, lengths, 1) for lengths in ([30, 30], [30, 21])]

        def host_read(*args, **kwargs):
            raise AssertionError("the forward read a tensor back to the host")

        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, host_read)
        for plan in plans:
            assert model(torch.zeros(2, 1, dtype=torch.long), plan).shape == (2, 1, VOCAB)


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("preset", ["tiny", "tiny-neo"])
def test_packing_matches_separate_forwards(preset):
    model = make_model(preset)
    lengths = [20, 7, 13]  # 20 > tiny-neo's window
    seqs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(seqs, dim=1)
    segment_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        separate = torch.cat([model(s) for s in seqs], dim=1)
        explicit = model(packed, AttentionPlan.packed(model.config, segment_ids, position_ids))
        implicit = model(packed, AttentionPlan.packed(model.config, segment_ids))  # positions restart
        unpacked = model(packed)
    assert (explicit - separate).abs().max().item() <= 1e-4
    assert (implicit - separate).abs().max().item() <= 1e-4
    assert (unpacked - separate).abs().max().item() > 1e-3  # without segments examples would mix


@pytest.mark.parametrize("preset", ["tiny", "tiny-neo"])
def test_shared_prefix_branches_match_separate_forwards(preset):
    """One row `prompt, reply A, reply B` (branch ids 0, 1, 2) gives each reply the logits it gets after the
    prompt alone; reply B's positions restart at the prompt's end. The prompt and reply A exceed tiny-neo's
    window, so its local layers must count positions, not row indices."""
    model = make_model(preset)
    config = model.config
    prompt, reply_a, reply_b = (torch.randint(0, VOCAB, (1, n)) for n in (12, 14, 9))
    row = torch.cat([prompt, reply_a, reply_b], dim=1)
    branch_ids = torch.tensor([[0] * 12 + [1] * 14 + [2] * 9])
    position_ids = torch.tensor([[*range(26), *range(12, 21)]])
    with torch.no_grad():
        a = model(torch.cat([prompt, reply_a], dim=1))
        b = model(torch.cat([prompt, reply_b], dim=1))
        shared = model(row, AttentionPlan.shared_prefix(config, branch_ids, position_ids))
        # two pairs in a batch, the second one shorter and padded (a segment of its own)
        batch = torch.cat([row, torch.cat([row[:, :20], torch.zeros(1, 15, dtype=torch.long)], dim=1)])
        batched = model(batch, AttentionPlan.shared_prefix(
            config, branch_ids.expand(2, -1), position_ids.expand(2, -1),
            segment_ids=torch.tensor([[1] * 35, [1] * 20 + [0] * 15])))
        shorter = model(row[:, :20], AttentionPlan.shared_prefix(config, branch_ids[:, :20], position_ids[:, :20]))
    assert (shared[:, :26] - a).abs().max().item() <= 1e-4
    assert (shared[:, 26:] - b[:, 12:]).abs().max().item() <= 1e-4
    assert (batched[:1] - shared).abs().max().item() <= 1e-4
    assert (batched[1:, :20] - shorter).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- weights, training switches
def test_resize_token_embeddings_keeps_rows_and_stays_tied():
    model = make_model()
    old = model.transformer.wte.weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 3)
    wte = model.transformer.wte.weight
    assert wte.shape == (VOCAB + 3, 64) and model.config.vocab_size == VOCAB + 3
    assert torch.equal(wte[:VOCAB], old)
    assert torch.allclose(wte[VOCAB:], old.mean(0).expand(3, -1), atol=1e-6)
    assert model.lm_head.weight is wte
    with torch.no_grad():
        assert model(torch.tensor([[VOCAB + 2]])).shape == (1, 1, VOCAB + 3)
    with torch.no_grad():
        wte[0].add_(1.0)  # still one tensor
    assert torch.equal(model.lm_head.weight[0], wte[0])


def test_dropout_only_in_train_mode():
    model = make_model(resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


def test_gradient_checkpointing_same_gradients():
    model = make_model().train()
    ids = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids).logsumexp(-1).mean().backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_embd=256, n_head=4, vocab_size=VOCAB, n_positions=64))
    block = model.transformer.h[3]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2 * 8)
    assert torch.all(block.ln_1.weight == 1) and torch.all(block.attn.c_attn.bias == 0)


@pytest.mark.parametrize(
    ("preset", "count"),
    [  # published parameter counts of the Hugging Face models (tied head counted once)
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("gpt-neo-125m", 125_198_592),
        ("gpt-neo-1.3b", 1_315_575_808),
    ],
)
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = GPT(get_preset(preset))
    assert model.num_parameters() == count


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_round_trips_through_hf(preset):
    config = get_preset(preset)
    hf_dict = config.to_hf_dict()
    assert ModelConfig.from_hf_dict(hf_dict) == config
    hf_config = transformers.AutoConfig.for_model(**hf_dict)  # transformers accepts our keys
    assert ModelConfig.from_hf_dict(hf_config.to_dict()) == config


def test_config_reads_hub_style_neo_keys():
    config = ModelConfig.from_hf_dict(
        {"model_type": "gpt_neo", "hidden_size": 128, "num_layers": 4, "num_heads": 8,
         "max_position_embeddings": 512, "attention_types": [[["global", "local"], 2]], "window_size": 32,
         "eos_token_id": [7]}
    )  # fmt: skip
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (128, 4, 8, 512)
    assert config.attention_layers == ["global", "local", "global", "local"]
    assert config.window_size == 32 and config.eos_token_id == 7


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "llama"}, "unsupported model_type 'llama'"),
        ({"n_embd": 64}, "no 'model_type'"),
        ({"model_type": "gpt2", "n_embd": 65, "n_head": 4}, "divisible"),
        ({"model_type": "gpt2", "activation_function": "mish"}, "activation_function"),
        ({"model_type": "gpt_neo", "num_layers": 3, "attention_types": [[["global", "local"], 1]]}, "3 layers"),
        ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_bad_configs_raise_config_error(config, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(config)


def test_unknown_preset():
    with pytest.raises(Gpt2ChatError, match="unknown model preset 'gpt5'"):
        get_preset("gpt5")


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
def test_a_quantized_model_makes_its_kv_cache(mode):
    """A quantized model's tied embedding has no `.weight`; its cache still has the model's compute dtype and
    takes a cached forward."""
    from gpt2chat.quantize import convert_for_inference

    model = convert_for_inference(make_model(), mode)
    cache = model.new_kv_cache(batch_size=2, max_len=16)
    assert cache.k[0].dtype == torch.float32 and cache.k[0].shape[0] == 2
    with torch.no_grad():
        logits = model(torch.zeros(2, 4, dtype=torch.long), AttentionPlan.for_cache(model.config, cache, [0, 0], 4))
    assert logits.shape[:2] == (2, 4) and torch.isfinite(logits).all()
