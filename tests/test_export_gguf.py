"""Exported GGUF files proven by llama.cpp itself (llama-cpp-python 0.3.36 and its libllama / libllama-common).

* logits on the same ids: f32 within 2e-3, f16 within 2e-2 of the largest logit, q8_0 teacher-forced top-1
  agreement >= 95% on 256 positions of real text;
* llama.cpp's tokenizer gives our ids for plain text, for typed spellings of our control tokens (plain text),
  and for each template's rendered conversation;
* the embedded chat template: rendered by llama.cpp's own C++ Jinja engine (the one `llama-server` runs, called
  through a small shim compiled against libllama-common) and by `create_chat_completion`, it gives our prompt
  tokens; the chat stops at the template's end-of-turn token and the reply equals our greedy reply;
* against llama.cpp's own `convert_hf_to_gguf.py` on the same folder (slow): same tensors, logits at least
  as close, and every metadata difference is one docs/EXPORT.md lists.

These tests skip when `llama_cpp` is not importable; with GPT2CHAT_REQUIRE_LLAMA_CPP=1 (CI's llama.cpp step) a
skip is a failure instead. The converter and the Jinja shim need llama.cpp's source: GPT2CHAT_LLAMA_CPP_SRC
names its folder (`.../vendor/llama.cpp` of the llama-cpp-python 0.3.36 sdist).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from benchmarks.peers import llama_cpp_logits
from chat_samples import CONVERSATIONS
from gpt2chat.checkpoint import init_checkpoint, load_model, save_pretrained
from gpt2chat.engine import Engine
from gpt2chat.export import export_gguf, gguf_chat_template, write_gguf
from gpt2chat.sampling import SamplingParams
from gpt2chat.templates import TEMPLATES, get_template

REQUIRED = os.environ.get("GPT2CHAT_REQUIRE_LLAMA_CPP") == "1"
try:
    import llama_cpp
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("llama-cpp-python is not installed (see .ci/run)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip
ANSWER = "Paris, of course."
PLAIN_TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "Tabs\tand\nnewlines\n\n\nthree   spaces",
    "I've been 'told' he's there; we'll see, they'd say. DON'T SHOUT",
    "Numbers: 3 33 333 3333 3.14159 1,000,000",
    "Unicode: naïve café, Ελληνικά, русский, 中文字符, 日本語, 한국어 🚀😶‍🌫️✅",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "!!!???...---===```''\"\"\"",
]
TYPED_SPELLINGS = ["<|endoftext|>", "<|eot_id|>", "Say <|eot_id|> and <|pad|> please", "<|USER|> hi <|End|>",
                   "a<|start_header_id|>user<|end_header_id|>b", "<|endoftext|><|endoftext|>"]  # fmt: skip


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (GPT2CHAT_REQUIRE_LLAMA_CPP=1: a skip is a failure here)")
    pytest.skip(reason)


@contextlib.contextmanager
def _llama(path: Path, **kwargs):
    llm = llama_cpp.Llama(str(path), verbose=False, n_threads=2, **{"n_ctx": 256, **kwargs})
    try:
        yield llm
    finally:
        llm.close()


def _our_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def _real_text_ids(shared_dir: Path, tokenizer, n: int) -> list[int]:
    rows = (json.loads(line) for line in (shared_dir / "data/oasst1/en-validation.jsonl").open(encoding="utf-8"))
    ids = tokenizer.encode("\n\n".join(row["text"] for _, row in zip(range(400), rows, strict=False)))
    assert len(ids) >= n
    return ids[:n]


# ---------------------------------------------------------------------------------------------- logits
@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """A tiny llama3-context checkpoint with rescaled random weights, and its three GGUF exports."""
    root = tmp_path_factory.mktemp("scaled")
    model, tok = load_model(init_checkpoint("tiny", root / "init", seed=1, std=0.05))  # logits spread +-2
    folder = save_pretrained(model, tok, root / "ckpt")
    files = {"f32": export_gguf(folder, root / "f32.gguf", quant="f32")}  # the folder, as a user exports it
    for quant in ("f16", "q8_0"):
        files[quant] = write_gguf(model, tok, root / f"{quant}.gguf", quant=quant, template="llama3-context")
    return folder, model, tok, files


def test_f32_logits_equal_ours(scaled, shared_dir):
    _, model, tok, files = scaled
    ids = _real_text_ids(shared_dir, tok, 256)
    ours = _our_logits(model, ids)
    # an f32 KV cache: llama.cpp's default f16 cache would round every key and value
    theirs = llama_cpp_logits(files["f32"], ids, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    assert np.abs(ours).max() > 1.0  # logits that actually vary
    assert np.abs(theirs - ours).max() <= 2e-3


def test_f16_logits_close_to_ours(scaled, shared_dir):
    _, model, tok, files = scaled
    ids = _real_text_ids(shared_dir, tok, 256)
    ours = _our_logits(model, ids)
    theirs = llama_cpp_logits(files["f16"], ids)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() <= 2e-2


def test_q8_0_top1_agrees_with_ours(scaled, shared_dir, tmp_path):
    """On GPT-2's own init (what `gpt2chat init` writes). Random weights leave many near-ties at the top,
    which 8-bit noise can flip; a trained model agrees more often (docs/EXPORT.md)."""
    _, _, _, files = scaled
    model, tok = load_model(init_checkpoint("tiny", tmp_path / "init", seed=0))
    ids = _real_text_ids(shared_dir, tok, 256)
    q8 = write_gguf(model, tok, tmp_path / "q8_0.gguf", quant="q8_0")
    theirs = llama_cpp_logits(q8, ids)
    assert (theirs.argmax(-1) == _our_logits(model, ids).argmax(-1)).mean() >= 0.95
    # 8.5 bits per weight against 16; the f32 norms, biases and position table keep it above half
    assert files["q8_0"].stat().st_size < 0.7 * files["f16"].stat().st_size


# ---------------------------------------------------------------------------------------------- chat models
def _answering_model(root: Path, name: str):
    """A tiny checkpoint whose greedy reply to QUESTION is ANSWER then the template's end-of-turn token.

    Random GPT-2 weights, except that the position rows where the reply is generated point at the reply's
    token embeddings (the head is tied to them), so the argmax there is the reply token whatever the blocks
    add. The logits tests above cover ordinary weights; this model makes the stop visible.
    """
    template = get_template(name)
    model, tok = load_model(init_checkpoint("tiny", root / f"{name}-init", template=name, seed=2))
    prompt, _ = template.render(tok, QUESTION, add_generation_prompt=True)
    full, _ = template.render(tok, [*QUESTION, {"role": "assistant", "content": ANSWER}])
    assert full[: len(prompt)] == prompt
    reply = full[len(prompt) :]  # the answer's tokens, then the end-of-turn token
    with torch.no_grad():
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        for i, token in enumerate(reply):
            wpe[len(prompt) - 1 + i] = 40.0 * wte[token]
    return model, tok, prompt, reply


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """Per template: (gguf file, model, tokenizer, prompt ids, reply ids ending with the end-of-turn id)."""
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for name in TEMPLATES:
        model, tok, prompt, reply = _answering_model(root, name)
        out[name] = (write_gguf(model, tok, root / f"{name}.gguf", quant="f32"), model, tok, prompt, reply)
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_llama_cpp_reads_our_special_tokens(chat_models, name):
    path, _, tok, _, _ = chat_models[name]
    template = get_template(name)
    with _llama(path, vocab_only=True) as llm:
        vocab = llm._model.vocab
        assert llama_cpp.llama_vocab_n_tokens(vocab) == len(tok)
        assert llama_cpp.llama_vocab_bos(vocab) == llama_cpp.llama_vocab_eos(vocab) == tok.eos_token_id
        assert llama_cpp.llama_vocab_pad(vocab) == tok.pad_token_id
        assert llama_cpp.llama_vocab_eot(vocab) == tok.token_to_id(template.end_of_turn)
        assert not llama_cpp.llama_vocab_get_add_bos(vocab)
        for token_id in tok.special_token_ids:
            attr = llama_cpp.llama_vocab_get_attr(vocab, token_id)
            assert attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, tok.id_to_token(token_id)
        eog = {i for i in range(len(tok)) if llama_cpp.llama_vocab_is_eog(vocab, i)}
        assert {tok.token_to_id(t) for t in template.stop_tokens} <= eog
        assert tok.pad_token_id not in eog


@pytest.mark.parametrize("name", ["llama3-context", "user-assistant"])
def test_tokenizer_plain_text_and_typed_spellings(chat_models, shared_dir, name):
    path, _, tok, _, _ = chat_models[name]
    rows = [json.loads(line)["text"] for line in (shared_dir / "data/oasst1/en-validation.jsonl").open(encoding="utf-8")]
    texts = PLAIN_TEXTS + TYPED_SPELLINGS + rows[:200]
    with _llama(path, vocab_only=True) as llm:
        for text in texts:
            # special=False: what a user types is text; a control token's spelling stays characters
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text), text
        for text in TYPED_SPELLINGS:
            assert not set(tok.encode(text)) & tok.special_token_ids


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_tokenizer_rendered_conversations(chat_models, name):
    """The rendered prompt text, tokenized by llama.cpp with control tokens parsed, gives our render's ids."""
    path, _, tok, _, _ = chat_models[name]
    template = get_template(name)
    conversations = [c for c in CONVERSATIONS if all("<|" not in m["content"] for m in c)]
    conversations.append([*QUESTION, {"role": "assistant", "content": ANSWER}])
    with _llama(path, vocab_only=True) as llm:
        for messages in conversations:
            for add in (True, False):
                text = template.render_text(messages, add_generation_prompt=add)
                ids, _ = template.render(tok, messages, add_generation_prompt=add)
                assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids


# ---------------------------------------------------------------------------------------------- chat
def _our_greedy(model, prompt: list[int], template, tok) -> tuple[list[int], str]:
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=tuple(template.stop_token_ids(tok)))
    result = Engine(model, device="cpu", dtype=torch.float32).generate([prompt], params)[0]
    return list(result.token_ids), result.finish_reason


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_create_chat_completion_with_the_embedded_template(chat_models, name):
    path, model, tok, prompt, reply = chat_models[name]
    template = get_template(name)
    ours, finish = _our_greedy(model, prompt, template, tok)
    assert (ours, finish) == (reply[:-1], "stop")  # the model does answer and stop (see the fixture)

    with _llama(path) as llm:
        assert llm.chat_format == "chat_template.default"  # the GGUF's own template, not a guess
        result = llm.create_chat_completion(messages=QUESTION, temperature=0.0, max_tokens=24)
        usage, choice = result["usage"], result["choices"][0]
        assert list(llm.input_ids[: usage["prompt_tokens"]]) == prompt
        # llama.cpp stopped because the template's end-of-turn token is end-of-generation in the file
        assert choice["finish_reason"] == "stop" and usage["completion_tokens"] == len(ours)
        start = usage["prompt_tokens"]
        assert list(llm.input_ids[start : start + len(ours)]) == ours
        assert choice["message"]["content"] == tok.decode(ours) == template.reply_prefix + ANSWER


# ---------------------------------------------------------------------------------------------- C++ Jinja
_SHIM = r"""
#include "chat.h"
#include <cstdlib>
#include <cstring>

// Render the model's chat template with llama.cpp's C++ Jinja engine, as llama-server does.
extern "C" char * gpt2chat_render(const llama_model * model, int n, const char ** roles, const char ** contents,
                                  int add_generation_prompt, int want_source, char ** error) {
    try {
        auto templates = common_chat_templates_init(model, "");
        if (want_source) {
            return strdup(common_chat_templates_source(templates.get()).c_str());
        }
        common_chat_templates_inputs inputs;
        inputs.use_jinja = true;
        inputs.add_generation_prompt = add_generation_prompt != 0;
        for (int i = 0; i < n; i++) {
            common_chat_msg message;
            message.role = roles[i];
            message.content = contents[i];
            inputs.messages.push_back(message);
        }
        return strdup(common_chat_templates_apply(templates.get(), inputs).prompt.c_str());
    } catch (const std::exception & e) {
        *error = strdup(e.what());
        return nullptr;
    }
}
"""


def _llama_cpp_source() -> Path:
    text = os.environ.get("GPT2CHAT_LLAMA_CPP_SRC")
    if not text:
        _unavailable("GPT2CHAT_LLAMA_CPP_SRC is not set (llama.cpp's source folder, see .ci/run)")
    source = Path(text)
    if not (source / "convert_hf_to_gguf.py").is_file():
        _unavailable(f"GPT2CHAT_LLAMA_CPP_SRC={source} has no convert_hf_to_gguf.py")
    init = source.parents[1] / "llama_cpp" / "__init__.py"  # the sdist's Python package beside vendor/
    if init.is_file() and f'"{llama_cpp.__version__}"' not in init.read_text():
        _unavailable(f"{source} is not the source of the installed llama-cpp-python {llama_cpp.__version__}")
    return source


@pytest.fixture(scope="module")
def jinja_shim(tmp_path_factory):
    """gpt2chat_render() from a shared library built against the installed libllama-common."""
    source = _llama_cpp_source()
    compiler = shutil.which("g++") or shutil.which("c++")
    site = Path(llama_cpp.__file__).resolve().parents[1]
    lib_dirs = [d for d in (site / "lib", site / "llama_cpp" / "lib") if (d / "libllama-common.so").exists()]
    if compiler is None or not lib_dirs:
        _unavailable("no C++ compiler, or no libllama-common.so in the llama-cpp-python install")
    out = tmp_path_factory.mktemp("shim")
    (out / "shim.cpp").write_text(_SHIM)
    includes = [source / "common", source / "include", source / "ggml" / "include", source / "vendor"]
    command = [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", str(out / "shim.cpp"), "-o", str(out / "shim.so"),
               *[f"-I{d}" for d in includes], f"-L{lib_dirs[0]}", "-lllama-common",
               *[f"-Wl,-rpath,{d}" for d in (*lib_dirs, site / "llama_cpp" / "lib")]]  # fmt: skip
    build = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    lib = ctypes.CDLL(str(out / "shim.so"))
    lib.gpt2chat_render.restype = ctypes.c_void_p  # freed with libc's free below
    lib.gpt2chat_render.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p),
                                    ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
                                    ctypes.POINTER(ctypes.c_char_p)]  # fmt: skip
    libc = ctypes.CDLL(None)
    libc.free.argtypes = [ctypes.c_void_p]

    def render(llm, messages: list[dict], add_generation_prompt: bool, want_source: bool = False) -> str:
        roles = (ctypes.c_char_p * len(messages))(*[m["role"].encode() for m in messages])
        contents = (ctypes.c_char_p * len(messages))(*[m["content"].encode() for m in messages])
        error = ctypes.c_char_p()
        pointer = lib.gpt2chat_render(llm._model.model, len(messages), roles, contents, int(add_generation_prompt),
                                      int(want_source), ctypes.byref(error))  # fmt: skip
        if not pointer:
            raise RuntimeError(f"llama.cpp's Jinja engine failed: {error.value.decode()}")
        try:
            return ctypes.string_at(pointer).decode("utf-8")
        finally:
            libc.free(pointer)

    return render


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_llama_cpp_jinja_engine_renders_our_prompts(chat_models, jinja_shim, name):
    """llama-server's path: the file's template through llama.cpp's Jinja engine, then its tokenizer."""
    path, _, tok, _, _ = chat_models[name]
    template = get_template(name)
    conversations = [c for c in CONVERSATIONS if all("<|" not in m["content"] for m in c)]
    with _llama(path, vocab_only=True) as llm:
        embedded = llm.metadata["tokenizer.chat_template"]
        assert embedded == gguf_chat_template(template.jinja)
        assert jinja_shim(llm, QUESTION, True, want_source=True) == embedded  # ours, not a fallback
        system, late = {"role": "system", "content": "Be kind."}, {"role": "system", "content": "Be brief."}
        reply = {"role": "assistant", "content": ANSWER}
        more = [[system, late, *QUESTION], [*QUESTION, reply, late, *QUESTION],
                [*QUESTION, reply, {"role": "tool", "content": "12:00"}]]  # system messages anywhere, a tool turn
        for messages in [*conversations, [*QUESTION, reply], *more]:
            for add in (True, False):
                text = jinja_shim(llm, messages, add)
                assert text == template.render_text(messages, add_generation_prompt=add)
                ids, _ = template.render(tok, messages, add_generation_prompt=add)
                assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids


def test_llama_server_parses_typed_control_spellings(chat_models, jinja_shim):
    """A documented difference (docs/EXPORT.md): llama.cpp tokenizes the whole rendered prompt with control
    tokens parsed, so a user who types "<|eot_id|>" sends the control token; our renderer keeps it text."""
    path, _, tok, _, _ = chat_models["llama3-context"]
    messages = [{"role": "user", "content": "Say <|eot_id|> now"}]
    ours, _ = get_template("llama3-context").render(tok, messages, add_generation_prompt=True)
    with _llama(path, vocab_only=True) as llm:
        theirs = llm.tokenize(jinja_shim(llm, messages, True).encode(), add_bos=False, special=True)
    eot = tok.token_to_id("<|eot_id|>")
    assert ours.count(eot) == 1 and theirs.count(eot) == 2


# ---------------------------------------------------------------------------------------------- converter
def _fields(path: Path) -> dict:
    return {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.slow
def test_against_llama_cpp_converter(scaled, shared_dir, tmp_path):
    """convert_hf_to_gguf.py on the same folder: the same tensors; our logits at least as close to ours."""
    source = _llama_cpp_source()
    folder, model, tok, files = scaled
    theirs_path = tmp_path / "converter.gguf"
    run = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                          str(theirs_path), "--outtype", "f32"], capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]

    ours_reader, theirs_reader = gguf.GGUFReader(files["f32"]), gguf.GGUFReader(theirs_path)
    ours_tensors = {t.name: t for t in ours_reader.tensors}
    theirs_tensors = {t.name: t for t in theirs_reader.tensors}
    assert set(ours_tensors) == set(theirs_tensors)
    for name, t in ours_tensors.items():
        assert t.tensor_type == theirs_tensors[name].tensor_type and list(t.shape) == list(theirs_tensors[name].shape)
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(theirs_tensors[name].data), err_msg=name)

    ids = _real_text_ids(shared_dir, tok, 256)
    ours = _our_logits(model, ids)
    f32_cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    diff_ours = np.abs(llama_cpp_logits(files["f32"], ids, **f32_cache) - ours).max()
    diff_theirs = np.abs(llama_cpp_logits(theirs_path, ids, **f32_cache) - ours).max()
    assert diff_ours <= diff_theirs + 1e-6 and diff_ours <= 2e-3

    ours_fields, theirs_fields = _fields(files["f32"]), _fields(theirs_path)
    differing = {k for k in ours_fields.keys() | theirs_fields.keys() if ours_fields.get(k) != theirs_fields.get(k)}
    documented = set(re.findall(r"`([a-z0-9_.]+)`", (REPO / "docs" / "EXPORT.md").read_text()))
    assert differing <= documented, f"undocumented metadata differences: {sorted(differing - documented)}"
    assert "tokenizer.ggml.eot_token_id" in differing  # the converter leaves the end-of-turn token out


# ---------------------------------------------------------------------------------------------- 124M
@pytest.mark.slow
def test_gpt2_124m_shape(tmp_path, shared_dir):
    """The real GPT-2 shape (random init, as `gpt2chat init --arch gpt2` writes it): the same bounds."""
    model, tok = load_model(init_checkpoint("gpt2", tmp_path / "gpt2"), device="cpu", dtype=torch.float32)
    ids = _real_text_ids(shared_dir, tok, 256)
    ours = _our_logits(model, ids)
    f32 = write_gguf(model, tok, tmp_path / "f32.gguf", quant="f32")
    f32_cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    assert np.abs(llama_cpp_logits(f32, ids, **f32_cache) - ours).max() <= 2e-3
    f32.unlink()
    f16 = write_gguf(model, tok, tmp_path / "f16.gguf", quant="f16")
    assert np.abs(llama_cpp_logits(f16, ids) - ours).max() / np.abs(ours).max() <= 2e-2
    f16.unlink()
    q8 = write_gguf(model, tok, tmp_path / "q8.gguf", quant="q8_0")
    assert (llama_cpp_logits(q8, ids).argmax(-1) == ours.argmax(-1)).mean() >= 0.95


# ---------------------------------------------------------------------------------------------- q4_0
def test_q4_0_is_our_int4_and_llama_cpp_answers(scaled, chat_models, shared_dir, tmp_path):
    """`export --type q4_0` holds the numbers of `--quantize int4`: llama.cpp's logits on the file are those of
    our int4 model (both also round activations to int8 blocks), far closer than either is to fp32; and
    llama.cpp chats with a q4_0 file: the same answer, stopped at the end-of-turn token."""
    from gpt2chat.quantize import convert_for_inference

    _, model, tok, _ = scaled
    ids = _real_text_ids(shared_dir, tok, 256)
    q4 = write_gguf(model, tok, tmp_path / "q4_0.gguf", quant="q4_0", template="llama3-context")
    theirs = llama_cpp_logits(q4, ids, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ours = _our_logits(convert_for_inference(model, "int4"), ids)
    fp32 = _our_logits(model, ids)
    gap = np.abs(theirs - ours).max()
    assert gap <= 0.05 * np.abs(fp32).max()
    assert gap <= 0.25 * np.abs(ours - fp32).max()

    name = "llama3-context"
    _, answering, tok, prompt, reply = chat_models[name]
    path = write_gguf(answering, tok, tmp_path / "answer-q4_0.gguf", quant="q4_0")
    with _llama(path) as llm:
        result = llm.create_chat_completion(messages=QUESTION, temperature=0.0, max_tokens=24)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == get_template(name).reply_prefix + ANSWER
