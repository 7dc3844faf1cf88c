"""`gpt2chat export` without llama.cpp: the GGUF file read back with the `gguf` package's own reader (layout,
types, tokenizer metadata, template), adapters merged, the HF folder, the Ollama Modelfile, and bad input
(not a checkpoint, unknown type, existing output, GPT-Neo, a full disk) with nothing half-written left.

llama.cpp itself runs the exported files in tests/test_export_gguf.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from chat_samples import CONVERSATIONS
from gpt2chat.checkpoint import init_checkpoint, load_model, save_pretrained
from gpt2chat.cli import main
from gpt2chat.export import ExportError, export_gguf, export_hf, gguf_chat_template, write_gguf
from gpt2chat.export.modelfile import GO_TEMPLATES
from gpt2chat.lora import apply_lora, merge_lora, save_adapter
from gpt2chat.templates import TEMPLATES, get_template


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


_READERS: dict[Path, gguf.GGUFReader] = {}
SPARE_ROWS = 6


def _reader(path: Path) -> gguf.GGUFReader:
    """Parsed once per file: GGUFReader spends seconds on the 50k token strings."""
    if path not in _READERS:
        _READERS[path] = gguf.GGUFReader(path)
    return _READERS[path]


def _fields(path: Path) -> dict:
    return {name: f.contents() for name, f in _reader(path).fields.items() if not name.startswith("GGUF.")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny user-assistant checkpoint whose embedding has SPARE_ROWS rows past the tokenizer (as padded
    vocabularies do)."""
    root = tmp_path_factory.mktemp("ckpt")
    model, tok = load_model(init_checkpoint("tiny", root / "init", template="user-assistant", seed=3))
    model.resize_token_embeddings(len(tok) + SPARE_ROWS)
    return save_pretrained(model, tok, root / "ckpt")


@pytest.fixture(scope="module")
def model_and_tokenizer(checkpoint):
    return load_model(checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def exports(checkpoint, model_and_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The checkpoint as GGUF in each type: the default (f16) through export_gguf, the others from memory."""
    root = tmp_path_factory.mktemp("exports")
    model, tok = model_and_tokenizer
    files = {"f16": export_gguf(checkpoint, root / "f16.gguf")}
    for quant in ("f32", "q8_0"):
        files[quant] = write_gguf(model, tok, root / f"{quant}.gguf", quant=quant, template="user-assistant")
    return files


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_tensors_are_llama_cpp_gpt2_layout(exports, model_and_tokenizer, quant):
    model, _ = model_and_tokenizer
    tensors = {t.name: t for t in _reader(exports[quant]).tensors}
    cfg = model.config
    expected_names = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
    for i in range(cfg.n_layer):
        for part in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"):
            expected_names |= {f"blk.{i}.{part}.weight", f"blk.{i}.{part}.bias"}
    assert set(tensors) == expected_names  # no output.weight: the head is tied to token_embd

    ours = model.state_dict()
    pairs = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "blk.1.attn_qkv.weight": "transformer.h.1.attn.c_attn.weight",
             "blk.1.attn_qkv.bias": "transformer.h.1.attn.c_attn.bias",
             "blk.0.ffn_down.weight": "transformer.h.0.mlp.c_proj.weight",
             "blk.0.ffn_up.weight": "transformer.h.0.mlp.c_fc.weight",
             "output_norm.weight": "transformer.ln_f.weight"}  # fmt: skip
    for gguf_name, our_name in pairs.items():
        t = tensors[gguf_name]
        want = ours[our_name].numpy()
        # GGUF lists ggml's dimension order: {in, out} for an nn.Linear [out, in]
        assert list(t.shape) == list(reversed(want.shape)), gguf_name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        is_matrix = want.ndim == 2 and gguf_name != "position_embd.weight"
        if quant == "f32" or not is_matrix:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, gguf_name
            np.testing.assert_array_equal(got, want)
        elif quant == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            scale = np.abs(want.reshape(-1, 32)).max(-1, keepdims=True) / 127  # one scale per 32 values
            # half a step, plus what storing the scale in f16 costs the largest of the 127 steps
            bound = scale / 2 + 127 * np.abs(scale - scale.astype(np.float16).astype(np.float32))
            assert (np.abs(got - want).reshape(-1, 32) <= bound * 1.001 + 1e-9).all()
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]  # fmt: skip
    assert _fields(exports[quant])["general.file_type"] == file_type


def test_hyperparameters_and_tokenizer_metadata(exports, model_and_tokenizer):
    model, tok = model_and_tokenizer
    fields = _fields(exports["f16"])
    cfg = model.config
    assert fields["general.architecture"] == "gpt2" and fields["general.name"] == "ckpt"
    assert (fields["gpt2.context_length"], fields["gpt2.embedding_length"], fields["gpt2.block_count"],
            fields["gpt2.attention.head_count"], fields["gpt2.feed_forward_length"]) == (
        cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head, 4 * cfg.n_embd)  # fmt: skip
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.layer_norm_epsilon)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")

    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size == len(tok) + SPARE_ROWS
    assert tokens[:3] == ["!", '"', "#"] and tokens[262] == "Ġthe"  # GPT-2's byte-level spellings
    assert tokens[: len(tok)] == [tok.id_to_token(i) for i in range(len(tok))]
    control = {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == tok.special_token_ids  # every added token (and <|endoftext|>) is a control token
    # embedding rows past the tokenizer: placeholder tokens llama.cpp never produces (as its converter writes)
    assert tokens[len(tok) :] == [f"[PAD{i}]" for i in range(len(tok), cfg.vocab_size)]
    assert types[len(tok) :] == [gguf.TokenType.UNUSED] * SPARE_ROWS
    assert {types[i] for i in range(len(tok)) if i not in control} == {gguf.TokenType.NORMAL}
    assert fields["tokenizer.ggml.merges"][0] == "Ġ t" and len(fields["tokenizer.ggml.merges"]) == 50000

    template = get_template("user-assistant")
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.bos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_token_id != tok.eos_token_id
    assert fields["tokenizer.ggml.eot_token_id"] == tok.token_to_id(template.end_of_turn) == tok.token_to_id("<|End|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == gguf_chat_template(template.jinja)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_gguf_chat_template_renders_like_ours_without_generation_tags(name):
    """The GGUF copy drops only the training-mask markers: Jinja renders it to our renderer's text."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = get_template(name)
    text = gguf_chat_template(template.jinja)
    tag = re.compile(r"\{%-?\s*(end)?generation")
    assert tag.search(template.jinja) and not tag.search(text)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    compiled = env.from_string(text)
    for messages in CONVERSATIONS:
        for add in (True, False):
            rendered = compiled.render(messages=messages, add_generation_prompt=add)
            assert rendered == template.render_text(messages, add_generation_prompt=add)


def test_template_override_sets_its_end_of_turn(checkpoint, model_and_tokenizer, tmp_path):
    """--template embeds that template and its end-of-turn id; one whose tokens the tokenizer lacks is refused."""
    model, tok = model_and_tokenizer
    plain = get_template("plain")
    fields = _fields(write_gguf(model, tok, tmp_path / "plain.gguf", template="plain"))
    assert fields["tokenizer.ggml.eot_token_id"] == tok.token_to_id(plain.end_of_turn) == tok.eos_token_id
    assert fields["tokenizer.chat_template"] == gguf_chat_template(plain.jinja)
    with pytest.raises(ExportError, match=r"'llama3-context' needs tokens .*'<\|begin_of_text\|>'"):
        export_gguf(checkpoint, tmp_path / "x.gguf", template="llama3-context")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------- adapters
def test_adapter_is_merged_into_gguf_and_hf(checkpoint, model_and_tokenizer, tmp_path):
    base, tok = load_model(checkpoint)
    apply_lora(base, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapter = save_adapter(base, tmp_path / "adapter", base_model_name_or_path=str(checkpoint))
    ids = torch.tensor([tok.encode("Merged adapters change the weights.")])
    with torch.no_grad():
        want_logits = base(ids)
    merged = merge_lora(base)
    want_qkv = merged.state_dict()["transformer.h.0.attn.c_attn.weight"].numpy()

    out = export_gguf(checkpoint, tmp_path / "m.gguf", quant="f32", adapter=adapter)
    qkv = next(t for t in _reader(out).tensors if t.name == "blk.0.attn_qkv.weight")
    np.testing.assert_allclose(np.asarray(qkv.data).reshape(want_qkv.shape), want_qkv, rtol=0, atol=1e-6)
    plain_qkv = model_and_tokenizer[0].state_dict()["transformer.h.0.attn.c_attn.weight"].numpy()
    assert np.abs(want_qkv - plain_qkv).max() > 1e-2  # the adapter really changed it

    folder = export_hf(checkpoint, tmp_path / "hf", adapter=adapter)
    reloaded, reloaded_tok = load_model(folder)
    assert not any("lora" in k for k in reloaded.state_dict())
    assert reloaded_tok.template_name == "user-assistant"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), want_logits, rtol=1e-5, atol=1e-5)


def test_typed_control_token_text_after_hf_export(checkpoint, model_and_tokenizer, tmp_path):
    """What README's Jinja-export paragraph says: transformers' apply_chat_template turns a typed control-token
    spelling into the control token by default (a tokenizer file cannot change that), and
    sanitize_control_tokens=True keeps it text, as our renderer does."""
    transformers = pytest.importorskip("transformers")
    _, tok = model_and_tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(export_hf(checkpoint, tmp_path / "hf")))
    typed = [{"role": "user", "content": "say <|End|> or <|endoftext|> please"}]
    clean = [{"role": "user", "content": "say End or endoftext please"}]
    control = tok.special_token_ids
    ours, _ = get_template("user-assistant").render(tok, typed, add_generation_prompt=True)
    clean_ids, _ = get_template("user-assistant").render(tok, clean, add_generation_prompt=True)
    written = sorted(i for i in clean_ids if i in control)  # the control tokens the template itself writes
    assert sorted(i for i in ours if i in control) == written

    default = list(hf.apply_chat_template(typed, add_generation_prompt=True, return_dict=False))
    assert sorted(i for i in default if i in control) == sorted([*written, tok.token_to_id("<|End|>"), 50256])

    kept = list(hf.apply_chat_template(typed, add_generation_prompt=True, return_dict=False,
                                       sanitize_control_tokens=True))
    assert sorted(i for i in kept if i in control) == written
    assert tok.decode(kept) == tok.decode(ours)
    assert hf.apply_chat_template(clean, add_generation_prompt=True, return_dict=False,
                                  sanitize_control_tokens=True) == clean_ids


def test_hf_export_of_gpt_neo_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = init_checkpoint("tiny-neo", tmp_path / "neo", template="guanaco")
    out = export_hf(folder, tmp_path / "out")
    ours, tok = load_model(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode("GPT-Neo stays a transformers model.")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- bad input
def test_gpt_neo_to_gguf_is_a_clear_error(tmp_path, capsys):
    folder = init_checkpoint("tiny-neo", tmp_path / "neo")
    with pytest.raises(ExportError, match="llama.cpp has no GPT-Neo architecture"):
        export_gguf(folder, tmp_path / "neo.gguf")
    assert main(["export", "--model", str(folder), "--format", "gguf", "--out", str(tmp_path / "neo.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "GPT-Neo" in err and "--format hf" in err
    assert not (tmp_path / "neo.gguf").exists() and _leftovers(tmp_path) == []


def test_not_a_checkpoint(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model")
    for fmt, out in (("gguf", tmp_path / "x.gguf"), ("hf", tmp_path / "x")):
        assert main(["export", "--model", str(empty), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "config.json: not found" in err and "not a checkpoint folder" in err
        assert not out.exists()
    assert main(["export", "--model", str(tmp_path / "missing"), "--format", "gguf", "--out", str(tmp_path / "y.gguf")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_unknown_type(checkpoint, tmp_path, capsys):
    with pytest.raises(ExportError, match="unknown GGUF type 'q5_k'.*f32, f16, q8_0, q4_0"):
        export_gguf(checkpoint, tmp_path / "m.gguf", quant="q5_k")
    with pytest.raises(SystemExit) as exit_info:  # argparse: a usage error, exit 2
        main(["export", "--model", str(checkpoint), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--type", "q4"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'q4'" in capsys.readouterr().err
    assert main(["export", "--model", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf"), "--type", "q8_0"]) == 2
    assert "--type goes with --format gguf" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    args = ["export", "--model", str(checkpoint), "--format", "gguf", "--out", str(out)]
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main([*args, "--force", "--type", "q8_0"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and out.stat().st_size > 2**20
    probe = tmp_path / "probe"
    probe.write_text("x")  # an ordinary new file's mode: the export is not private
    assert out.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
    probe.unlink()

    hf_out = tmp_path / "hf"
    hf_out.mkdir()
    (hf_out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export_hf(checkpoint, hf_out)
    assert export_hf(checkpoint, hf_out, force=True) == hf_out
    assert (hf_out / "config.json").is_file() and not (hf_out / "keep.txt").exists()
    with pytest.raises(ExportError, match="is a folder"):
        export_gguf(checkpoint, hf_out)
    assert _leftovers(tmp_path) == []


def test_full_disk_leaves_nothing_behind(checkpoint, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of the tensor data: a clear error, no temp file, the old output untouched."""
    real_write = gguf.GGUFWriter.write_tensors_to_file

    def write_then_fill_up(self, *args, **kwargs):
        for f in self.fout:
            f.write(b"\0" * 4096)  # part of the data is on disk when the device fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "m.gguf"
    out.write_bytes(b"old export")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_then_fill_up)
    assert main(["export", "--model", str(checkpoint), "--format", "gguf", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device while writing" in err and str(out) in err
    assert out.read_bytes() == b"old export" and _leftovers(tmp_path) == []

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real_write)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ExportError, match="no space left"):
        export_hf(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and _leftovers(tmp_path) == []


def test_too_little_free_space_is_refused_before_writing(checkpoint, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage._replace(free=1000))
    with pytest.raises(ExportError, match=r"not enough free space .* MiB needed, 0\.0 MiB free"):
        export_gguf(checkpoint, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_non_gpt2_tokenizer_is_refused(checkpoint, tmp_path):
    folder = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match="not GPT-2's byte-level BPE"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- Ollama
def test_modelfile_names_the_stop_tokens(checkpoint, tmp_path):
    out = tmp_path / "chat.gguf"
    assert main(["export", "--model", str(checkpoint), "--format", "gguf", "--out", str(out), "--modelfile"]) == 0
    text = (tmp_path / "chat.Modelfile").read_text()
    assert "FROM ./chat.gguf\n" in text
    assert 'PARAMETER stop "<|End|>"\n' in text and 'PARAMETER stop "<|endoftext|>"\n' in text
    assert "PARAMETER num_ctx 256\n" in text
    assert f'TEMPLATE """{GO_TEMPLATES["user-assistant"]}"""' in text
    export_gguf(checkpoint, tmp_path / "p.gguf", template="plain", modelfile=tmp_path / "Modelfile")
    assert 'PARAMETER stop """\nUser:"""\n' in (tmp_path / "Modelfile").read_text()
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(checkpoint, tmp_path / "q.gguf", modelfile=tmp_path / "Modelfile")
    assert not (tmp_path / "q.gguf").exists()


def test_every_template_has_an_ollama_twin():
    assert set(GO_TEMPLATES) == set(TEMPLATES)


_GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("m").Parse(c.Template))
		var b strings.Builder
		if err := t.Execute(&b, map[string]interface{}{"Messages": c.Messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")
def test_ollama_templates_render_like_ours_in_go(tmp_path):
    """Go's text/template (what Ollama runs) renders each twin to our prompt text; Ollama asks for the
    assistant's turn itself, so the generation prompt follows a user turn (or a tool result), never an
    assistant's. Leading system messages merge, later ones and tool results stay in place, as in the Jinja."""
    (tmp_path / "main.go").write_text(_GO_RENDER)
    cases, want = [], []
    system, user, reply = ({"role": r, "content": c} for r, c in (("system", "Be kind."), ("user", "Hi"),
                                                                    ("assistant", "Hello")))
    more = [[system, {"role": "system", "content": "Be brief."}, user],
            [user, reply, {"role": "system", "content": "Now in French."}, user],
            [system, user, reply, {"role": "tool", "content": "12:00"}],
            [user, {"role": "system", "content": "late"}]]
    for name, go_template in GO_TEMPLATES.items():
        for messages in [*CONVERSATIONS, *more]:
            cases.append({"template": go_template, "messages": messages})
            answer_next = messages[-1]["role"] != "assistant"  # after a user turn or a tool's result
            want.append(get_template(name).render_text(messages, add_generation_prompt=answer_next))
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(tmp_path / "go-cache")}
    run = subprocess.run(["go", "run", "main.go"], input=json.dumps(cases), capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == want
