"""LoRA: identity at init, only adapters train, merge, and PEFT-layout adapters that PEFT and we both load.

Interop tests build one checkpoint folder per architecture and load it twice: as our GPT
(`load_model`) and as transformers' model (`AutoModelForCausalLM`); adapters move between the two
through the folder layout only.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gpt2chat.config import get_preset
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.lora import LoRALinear, apply_lora, load_adapter, lora_modules, merge_lora, save_adapter
from gpt2chat.model import GPT

# transformers deprecation notices raised inside the peers' own code
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ARCHS = ["tiny", "tiny-neo"]
DEFAULT_LEAVES = {
    "tiny": {"c_attn", "c_proj", "c_fc"},
    "tiny-neo": {"q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"},
}


def _small_model(arch: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset(arch, vocab_size=128)).eval()


def _ids(vocab: int, seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomise_adapters(named_params, seed: int = 1) -> None:
    """Non-zero B (and fresh A) so that an adapter really changes the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in named_params:
        if "lora_A" in name or "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _expected_lora_params(arch: str, r: int) -> int:
    """r * (in + out) summed over the default targets, from the config's sizes alone."""
    cfg = get_preset(arch)
    d, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
    if arch == "tiny":  # c_attn d->3d, attn.c_proj d->d, c_fc d->inner, mlp.c_proj inner->d
        per_layer = (d + 3 * d) + (d + d) + (d + inner) + (inner + d)
    else:  # q, k, v, out_proj d->d, c_fc d->inner, c_proj inner->d
        per_layer = 4 * (d + d) + (d + inner) + (inner + d)
    return r * per_layer * cfg.n_layer


# ----------------------------------------------------------------------------------------------------
# Our layers alone


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_is_identity_and_only_adapters_are_trainable(arch):
    model = _small_model(arch)
    ids = _ids(128)
    before = model(ids)
    n_trainable = apply_lora(model, r=4, alpha=8, dropout=0.1)

    assert torch.equal(model(ids), before)  # B = 0 at init (eval mode: no dropout)
    assert n_trainable == _expected_lora_params(arch, r=4)
    wrapped = lora_modules(model)
    assert {path.split(".")[-1] for path in wrapped} == DEFAULT_LEAVES[arch]
    assert not any(path.startswith("lm_head") for path in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == n_trainable


@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_step_changes_only_adapter_weights(arch):
    model = _small_model(arch)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    # every parameter goes to the optimizer, with weight decay: frozen ones must still not move
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = _ids(128, seed=3)
    logits = model(ids)
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"
    assert all(not torch.equal(p, b_before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_unknown_target_lists_valid_module_names():
    model = _small_model("tiny")
    with pytest.raises(Gpt2ChatError) as err:
        apply_lora(model, targets=["c_attn", "q_proj"])
    message = str(err.value)
    assert "q_proj" in message and all(name in message for name in ("c_attn", "c_fc", "c_proj"))
    assert not lora_modules(model)  # nothing half-applied
    # a dotted suffix selects only that projection
    apply_lora(model, r=2, alpha=4, targets=["mlp.c_proj"])
    assert sorted(lora_modules(model)) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


@pytest.mark.parametrize(
    "kwargs, field", [({"r": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout")]
)
def test_bad_lora_settings(kwargs, field):
    with pytest.raises(Gpt2ChatError, match=field):
        apply_lora(_small_model("tiny"), **kwargs)


def test_apply_twice_is_an_error():
    model = _small_model("tiny")
    apply_lora(model)
    with pytest.raises(Gpt2ChatError, match="already has LoRA"):
        apply_lora(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_restores_plain_linears_with_same_logits(arch):
    model = _small_model(arch)
    original_keys = set(model.state_dict())
    ids = _ids(128, seed=4)
    base_logits = model(ids)
    apply_lora(model, r=4, alpha=16, dropout=0.0)
    _randomise_adapters(model.named_parameters())
    with torch.no_grad():
        lora_logits = model(ids)
    assert (lora_logits - base_logits).abs().max() > 1e-2  # the adapter does something
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == original_keys
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(ids), lora_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(Gpt2ChatError, match="no LoRA"):
        merge_lora(model)


def test_dropout_only_in_training_and_rslora_scaling():
    model = _small_model("tiny")
    apply_lora(model, r=4, alpha=8, dropout=0.5, targets=["c_attn"], use_rslora=False)
    layer = next(iter(lora_modules(model).values()))
    assert layer.scaling == pytest.approx(2.0)
    _randomise_adapters(model.named_parameters())
    ids = _ids(128)
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))
    other = _small_model("tiny")
    apply_lora(other, r=4, alpha=8, targets=["c_attn"], use_rslora=True)
    assert next(iter(lora_modules(other).values())).scaling == pytest.approx(4.0)


# ----------------------------------------------------------------------------------------------------
# Interop with PEFT / transformers through checkpoint folders


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint_dir(request, tmp_path_factory):
    from gpt2chat.checkpoint import init_checkpoint

    return request.param, init_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=0)


def _ours(folder):
    from gpt2chat.checkpoint import load_model

    model, tokenizer = load_model(folder, device="cpu")
    return model.eval(), tokenizer


def _hf(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_our_adapter_loads_with_peft_same_logits(checkpoint_dir, tmp_path):
    peft = pytest.importorskip("peft")
    arch, folder = checkpoint_dir
    ours, _ = _ours(folder)
    apply_lora(ours, r=4, alpha=8, dropout=0.05)
    _randomise_adapters(ours.named_parameters())
    adapter_dir = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] is (arch == "tiny")
    assert config["base_model_name_or_path"] == str(folder)

    base = _hf(folder)
    ids = _ids(ours.config.vocab_size, seed=5)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
        theirs = peft_model(input_ids=ids).logits
        mine = ours(ids)
    assert (theirs - base_logits).abs().max() > 1e-2  # PEFT really applied our factors
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_peft_adapter_loads_into_ours_same_logits(checkpoint_dir, tmp_path):
    peft = pytest.importorskip("peft")
    arch, folder = checkpoint_dir
    targets = ["c_attn", "c_fc"] if arch == "tiny" else ["q_proj", "v_proj", "c_proj"]
    config = peft.LoraConfig(
        r=3, lora_alpha=12, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
        fan_in_fan_out=arch == "tiny",
    )
    peft_model = peft.get_peft_model(_hf(folder), config).eval()
    _randomise_adapters(peft_model.named_parameters(), seed=7)
    peft_model.save_pretrained(tmp_path / "peft-adapter")

    ours, _ = _ours(folder)
    n_trainable = load_adapter(ours, tmp_path / "peft-adapter")
    assert n_trainable == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert {p.split(".")[-1] for p in lora_modules(ours)} == set(targets)
    ids = _ids(ours.config.vocab_size, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    # and back out: our save of the loaded adapter has PEFT's own key names and tensors
    from safetensors.torch import load_file

    save_adapter(ours, tmp_path / "resaved", base_model_name_or_path=str(folder))
    theirs = load_file(tmp_path / "peft-adapter" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key


def test_merged_model_saves_a_plain_checkpoint_transformers_loads(checkpoint_dir, tmp_path):
    from gpt2chat.checkpoint import save_pretrained

    arch, folder = checkpoint_dir
    ours, tokenizer = _ours(folder)
    apply_lora(ours, r=4, alpha=8, dropout=0.0)
    _randomise_adapters(ours.named_parameters(), seed=9)
    ids = _ids(ours.config.vocab_size, seed=8)
    with torch.no_grad():
        lora_logits = ours(ids)
    merge_lora(ours)
    save_pretrained(ours, tokenizer, tmp_path / "merged")
    with torch.no_grad():
        reloaded = _hf(tmp_path / "merged")(input_ids=ids).logits
    torch.testing.assert_close(reloaded, lora_logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Bad adapter folders


@pytest.fixture()
def saved_adapter(tmp_path):
    model = _small_model("tiny")
    apply_lora(model, r=4, alpha=8)
    _randomise_adapters(model.named_parameters())
    return save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_adapter_round_trip_into_our_model(saved_adapter):
    source = _small_model("tiny")
    load_adapter(source, saved_adapter)
    fresh = _small_model("tiny")
    load_adapter(fresh, saved_adapter)
    ids = _ids(128)
    torch.testing.assert_close(fresh(ids), source(ids))
    load_adapter(fresh, saved_adapter)  # same adapters already there: factors are overwritten, no error


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
        ({"use_dora": True}, "use_dora"),
        ({"r": 0}, "'r'"),
        ({"r": 8}, "shape"),  # the tensors are rank 4
        ({"lora_alpha": "big"}, "lora_alpha"),
        ({"target_modules": ["c_fc"]}, "target_modules"),
        ({"task_type": "SEQ_CLS"}, "task_type"),
    ],
)
def test_bad_adapter_config_is_a_clear_error(saved_adapter, changes, match):
    _edit_config(saved_adapter, **changes)
    model = _small_model("tiny")
    with pytest.raises(Gpt2ChatError, match=match):
        load_adapter(model, saved_adapter)
    assert not lora_modules(model)


def test_adapter_for_another_model_size_or_shape(saved_adapter):
    bigger = GPT(get_preset("tiny", vocab_size=128, n_embd=32, n_head=4))
    with pytest.raises(Gpt2ChatError, match="shape"):
        load_adapter(bigger, saved_adapter)
    neo = _small_model("tiny-neo")
    with pytest.raises(Gpt2ChatError, match="not a linear layer"):
        load_adapter(neo, saved_adapter)


def test_missing_or_corrupt_adapter_files(saved_adapter, tmp_path):
    with pytest.raises(Gpt2ChatError, match="not found"):
        load_adapter(_small_model("tiny"), tmp_path / "nowhere")
    (saved_adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Gpt2ChatError, match="cannot read"):
        load_adapter(_small_model("tiny"), saved_adapter)
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(Gpt2ChatError, match="no adapter_model"):
        load_adapter(_small_model("tiny"), saved_adapter)
    (saved_adapter / "adapter_config.json").write_text("{oops")
    with pytest.raises(Gpt2ChatError, match="JSON"):
        load_adapter(_small_model("tiny"), saved_adapter)


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(Gpt2ChatError, match="no LoRA"):
        save_adapter(_small_model("tiny"), tmp_path / "x", base_model_name_or_path="tiny")
