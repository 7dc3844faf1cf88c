"""Checkpoint folders: both ways with transformers (same logits), the file formats we read, and a clear
CheckpointError for every kind of bad folder or unreachable hub id."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2chat import checkpoint
from gpt2chat.checkpoint import CheckpointError, load_model, resolve_checkpoint, save_pretrained
from gpt2chat.config import get_preset
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.model import GPT
from gpt2chat.tokenizer import Tokenizer
from hostile_files import RunsCode

transformers = pytest.importorskip("transformers")

GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.gpt2()


def our_model(preset: str, vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset(preset, vocab_size=vocab_size)).eval()


def hf_model(preset: str, vocab_size: int = GPT2_VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**get_preset(preset, vocab_size=vocab_size).to_hf_dict())
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def max_diff(ours: GPT, hf, vocab: int, length: int = 40) -> float:
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours(ids)
    assert mine.shape[-1] >= theirs.shape[-1]  # ours may carry an extra row for <|pad|>
    return (mine[..., : theirs.shape[-1]] - theirs).abs().max().item()


# ---------------------------------------------------------------- both ways with transformers
@pytest.mark.parametrize("preset", ["tiny", "tiny-neo"])
def test_ours_to_transformers(preset, tokenizer, tmp_path):
    model = our_model(preset, len(tokenizer))
    save_pretrained(model, tokenizer, tmp_path)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: not stored twice
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(model, hf, len(tokenizer)) <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf_tok) == len(tokenizer) and hf_tok.pad_token_id == tokenizer.pad_token_id
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pad_token_id"] == tokenizer.pad_token_id != config["eos_token_id"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-neo"])
def test_transformers_to_ours(preset, tmp_path):
    hf = hf_model(preset)
    hf.save_pretrained(tmp_path)  # weights and config only: our GPT-2 tokenizer is the fallback
    model, tok = load_model(tmp_path, device="cpu")
    assert not model.training
    # the fallback tokenizer brings <|pad|> (id 50257): the embedding grew one row for it
    assert len(tok) == model.config.vocab_size == GPT2_VOCAB + 1
    assert model.lm_head.weight is model.transformer.wte.weight
    assert max_diff(model, hf, GPT2_VOCAB) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpt2", "gpt-neo-125m"])
def test_full_size_both_ways(preset, tokenizer, tmp_path):
    hf = hf_model(preset)
    hf.save_pretrained(tmp_path / "theirs")
    ours, _ = load_model(tmp_path / "theirs", device="cpu")
    assert max_diff(ours, hf, GPT2_VOCAB, length=300) <= 1e-4
    del hf
    model = our_model(preset, len(tokenizer))
    save_pretrained(model, tokenizer, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert max_diff(model, hf, GPT2_VOCAB, length=300) <= 1e-4


def test_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """openai-community/gpt2 stores `h.0...` (no `transformer.`) plus attn.bias / masked_bias buffers."""
    hf = hf_model("tiny")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in state.items()}
    for layer in range(2):
        renamed[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(256, 256)).view(1, 1, 256, 256)
        renamed[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    renamed["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(renamed, tmp_path / "model.safetensors")
    model, _ = load_model(tmp_path, device="cpu")
    assert max_diff(model, hf, GPT2_VOCAB) <= 1e-4


def test_pytorch_model_bin_loads(tmp_path):
    hf = hf_model("tiny-neo")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, _ = load_model(tmp_path, device="cpu")
    assert max_diff(model, hf, GPT2_VOCAB) <= 1e-4


def test_pickled_code_in_bin_is_refused(tmp_path):
    hf_model("tiny").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": RunsCode(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused"):
        load_model(tmp_path, device="cpu")
    assert not marker.exists()


def test_sharded_safetensors(tmp_path):
    hf = hf_model("tiny")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_model(tmp_path, device="cpu")
    assert max_diff(model, hf, GPT2_VOCAB) <= 1e-4

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard file 'model-00002-of-00002.safetensors' is missing"):
        load_model(tmp_path, device="cpu")
    weight_map[names[0]] = "../../etc/passwd"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_model(tmp_path, device="cpu")


def test_dtype_and_device(saved_tiny):
    model, _ = load_model(str(saved_tiny), device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.transformer.wte.weight.device.type == "cpu"
    with pytest.raises(Gpt2ChatError, match="unsupported dtype 'int8'"):
        load_model(saved_tiny, device="cpu", dtype="int8")


def test_saved_files_are_readable_by_others_like_save_pretrained_writes_them(tokenizer, tmp_path):
    old = os.umask(0o022)
    try:
        save_pretrained(our_model("tiny", len(tokenizer)), tokenizer, tmp_path / "ckpt")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "ckpt").iterdir()}
    assert len(modes) >= 7 and set(modes.values()) == {"0o644"}, modes


def test_save_refuses_tokenizer_larger_than_embedding(tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="resize_token_embeddings"):
        save_pretrained(our_model("tiny", 1000), tokenizer, tmp_path)


# ---------------------------------------------------------------- bad folders
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "ckpt"
    save_pretrained(our_model("tiny", len(tokenizer)), tokenizer, folder)
    return folder


@pytest.fixture()
def good_folder(saved_tiny, tmp_path) -> Path:
    """A fresh copy of a good checkpoint folder, for a test to damage."""
    return Path(shutil.copytree(saved_tiny, tmp_path / "ckpt"))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_config(good_folder):
    (good_folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: not found.*gpt2chat init"):
        load_model(good_folder, device="cpu")


def test_config_not_json(good_folder):
    (good_folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(good_folder, device="cpu")


def test_unknown_model_type(good_folder):
    edit_config(good_folder, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'llama'"):
        load_model(good_folder, device="cpu")


def test_missing_tensor(good_folder):
    state = load_file(good_folder / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, good_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'transformer\.h\.1\.mlp\.c_fc\.weight' is missing"):
        load_model(good_folder, device="cpu")


def test_wrong_shape(good_folder):
    edit_config(good_folder, n_layer=3)  # config says three layers, the weights have two
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.2\.ln_1\.weight' is missing"):
        load_model(good_folder, device="cpu")
    edit_config(good_folder, n_layer=2, n_inner=128)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \[64, 256\], config\.json implies \[64, 128\]"):
        load_model(good_folder, device="cpu")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(good_folder, damage):
    path = good_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00\xff" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or unreadable"):
        load_model(good_folder, device="cpu")


def test_no_weights(good_folder):
    (good_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(good_folder, device="cpu")


def test_tokenizer_larger_than_embedding(good_folder, tokenizer):
    bigger = Tokenizer.gpt2()
    bigger.add_special_tokens(["<|extra_a|>", "<|extra_b|>"])
    bigger.save(good_folder)
    with pytest.raises(CheckpointError, match=r"50260 tokens but the model's embedding has 50258 rows.*<\|extra_a\|>"):
        load_model(good_folder, device="cpu")


def test_nonexistent_folder_never_asks_the_hub(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked about a folder path")

    monkeypatch.setattr(checkpoint, "_from_hub", no_hub)
    for path in ("./no-such-ckpt", str(tmp_path / "missing"), "~/no/such/ckpt", "runs/sft/final"):
        with pytest.raises(CheckpointError, match="no such folder"):
            resolve_checkpoint(path)
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
        (tmp_path / "file.txt").write_text("x")
        resolve_checkpoint(tmp_path / "file.txt")


def test_hub_id_offline_fails_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache.*HF_HUB_OFFLINE.*--model.*gpt2chat init"):
        load_model("openai-community/gpt2", device="cpu")


def test_hub_unreachable_fails_with_what_to_do(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def cache_miss(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    def refused(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_miss)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refused)
    with pytest.raises(CheckpointError, match=r"could not get 'gpt2'.*could not be reached.*gpt2chat init"):
        resolve_checkpoint("gpt2")


def test_hub_that_never_answers_gives_up(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoint, "HUB_TIMEOUT_S", 0.2)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download",
        lambda *a, **k: (_ for _ in ()).throw(huggingface_hub.errors.LocalEntryNotFoundError("not cached")),
    )  # fmt: skip
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: time.sleep(30))
    with pytest.raises(CheckpointError, match="TimeoutError"):
        resolve_checkpoint("someone/some-model")


# ---------------------------------------------------------------- init_checkpoint (needs templates)
def test_init_checkpoint_loads_here_and_in_transformers(tiny_checkpoint):
    templates = pytest.importorskip("gpt2chat.templates")
    model, tok = load_model(tiny_checkpoint, device="cpu")
    assert tok.template_name == "llama3-context"
    assert model.config.vocab_size == len(tok)
    for token in templates.get_template("llama3-context").special_tokens:
        assert tok.token_to_id(token) is not None
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    assert max_diff(model, hf, len(tok)) <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert hf_tok.chat_template  # the template travels as Jinja


def test_init_checkpoint_is_seeded(tmp_path, tiny_checkpoint):
    pytest.importorskip("gpt2chat.templates")
    from gpt2chat.checkpoint import init_checkpoint

    before = torch.get_rng_state()
    a = load_file(init_checkpoint("tiny", tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(init_checkpoint("tiny", tmp_path / "b", seed=3) / "model.safetensors")
    seed0 = load_file(tiny_checkpoint / "model.safetensors")
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], seed0[key])
    with pytest.raises(Gpt2ChatError, match="unknown model preset 'gpt7'"):
        init_checkpoint("gpt7", tmp_path / "d")


def test_a_wide_init_spreads_weights_biases_and_gains_and_stays_seeded(tmp_path):
    from gpt2chat.checkpoint import init_checkpoint

    narrow = load_file(init_checkpoint("tiny", tmp_path / "n", seed=1) / "model.safetensors")
    wide = load_file(init_checkpoint("tiny", tmp_path / "w", seed=1, std=0.05) / "model.safetensors")
    again = load_file(init_checkpoint("tiny", tmp_path / "a", seed=1, std=0.05) / "model.safetensors")
    weight, bias, gain = "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias", "transformer.h.0.ln_1.weight"
    assert narrow[weight].std() == pytest.approx(0.02, rel=0.1) and wide[weight].std() == pytest.approx(0.05, rel=0.1)
    assert not narrow[bias].any() and wide[bias].std() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(narrow[gain], torch.ones_like(narrow[gain])) and wide[gain].std() == pytest.approx(0.1, rel=0.3)
    assert all(torch.equal(wide[k], again[k]) for k in wide)
