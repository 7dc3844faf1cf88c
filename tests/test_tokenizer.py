"""GPT-2 tokenizer: HF-identical ids, plain-text safety, save/load round trip, streaming decode, bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.tokenizer import IncrementalDecoder, Tokenizer, _gpt2_data_files

SAMPLES = [
    "Hello world",
    " Hello world",
    "Hello, how are you? I'm fine; we'll see. It's 2024-05-01 12:30.",
    "  leading spaces and trailing   ",
    "\n\nNew lines\n\n\nand\ttabs\r\n",
    "def f(x):\n    return x ** 2  # square\n",
    "emoji 😀🎉👍🏽 and CJK 中文字符 日本語 한국어",
    "Ünïcödé àccents — dashes … and “quotes”",
    "numbers 1234567890 3.14159 1e-5",
    "",
    " ",
    "<|endoftext|>",
    "a<|endoftext|>b <|pad|> <|eot_id|>",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """transformers' GPT-2 tokenizer built from OpenAI's vocab/merges files (no tokenizer.json)."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf-gpt2")
    enc, bpe = _gpt2_data_files()
    shutil.copy(enc, d / "vocab.json")
    shutil.copy(bpe, d / "merges.txt")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(d))
    return ref


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    t = Tokenizer.gpt2()
    t.add_special_tokens(["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"])
    d = tmp_path_factory.mktemp("saved-tok")
    t.save(d, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}", template_name="demo")
    return t, d




def test_gpt2_basics(tok):
    assert tok.eos_token_id == 50256
    assert tok.pad_token_id == 50257
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == 50258
    assert tok.special_token_ids == {50256, 50257}
    assert tok.token_to_id("<|endoftext|>") == 50256
    assert tok.id_to_token(50257) == "<|pad|>"
    assert tok.token_to_id("no-such-token") is None
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert tok.template_name is None


def test_data_files_match_shared_copy(shared_dir):
    enc, bpe = _gpt2_data_files()
    ref = shared_dir / "tokenizer" / "gpt2"
    assert enc.read_bytes() == (ref / "encoder.json").read_bytes()
    assert bpe.read_bytes() == (ref / "vocab.bpe").read_bytes()


def test_ids_equal_hf_gpt2(tok, hf_reference):
    for text in SAMPLES:
        if "<|" in text:
            continue  # HF parses special-token spellings; we never do (tested below)
        assert tok.encode(text) == hf_reference(text)["input_ids"], text


def test_ids_equal_hf_on_real_data(tok, hf_reference, shared_dir):
    rows = []
    with open(shared_dir / "data" / "oasst1" / "en-validation.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 200:
                break
            row = json.loads(line)
            rows.append(json.dumps(row, ensure_ascii=False))
    rows = [r.replace("<|endoftext|>", "") for r in rows]
    ours = tok.encode_batch(rows)
    theirs = hf_reference(rows)["input_ids"]
    assert ours == theirs
    assert ours == [tok.encode(r) for r in rows]


def test_plain_text_never_becomes_a_control_token(tok):
    t = Tokenizer.gpt2()
    t.add_special_tokens(["<|eot_id|>", "<|USER|>"])
    for spelling in ["<|endoftext|>", "<|pad|>", "<|eot_id|>", "<|USER|>"]:
        for text in [spelling, f"a {spelling} b", spelling * 3]:
            ids = t.encode(text)
            assert not set(ids) & t.special_token_ids, (text, ids)
            assert t.decode(ids) == text
    ids = t.encode_batch(["<|eot_id|>", "x<|endoftext|>"])
    assert not {i for row in ids for i in row} & t.special_token_ids
    ids, _ = t.encode_with_offsets("<|USER|>")
    assert not set(ids) & t.special_token_ids


def test_add_special_tokens_ids_and_order():
    t = Tokenizer.gpt2()
    assert t.add_special_tokens(["<|a|>", "<|b|>", "<|a|>"]) == 2
    assert t.token_to_id("<|a|>") == 50258 and t.token_to_id("<|b|>") == 50259
    assert t.add_special_tokens(["<|b|>", "<|c|>", "<|endoftext|>", "<|pad|>"]) == 1
    assert t.token_to_id("<|c|>") == 50260
    assert len(t) == 50261
    assert t.special_token_ids == {50256, 50257, 50258, 50259, 50260}
    assert t.decode([15496, 50258, 995]) == "Hello<|a|> world"
    assert t.decode([15496, 50258, 995], skip_special_tokens=True) == "Hello world"
    with pytest.raises(Gpt2ChatError):
        t.add_special_tokens([""])


def test_offsets(tok):
    text = "Hi there, 😀 中文!"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert len(offsets) == len(ids)
    assert offsets[0] == (0, 2) and text[offsets[1][0]:offsets[1][1]] == " there"
    for (s, e), (s2, _) in zip(offsets, offsets[1:], strict=False):
        assert 0 <= s <= e <= len(text) and s <= s2
    assert offsets[-1][1] == len(text)


def test_decode_round_trip(tok):
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "中文字符 日本語のテキスト 한국어",
    "mixed é ñ ß Ω 🐍 code\n\tend",
])
def test_incremental_decoder_utf8_safe(tok, text):
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    for p in pieces:
        assert "\ufffd" not in p
    # some token really was a partial character (otherwise the test proves nothing)
    assert any(p == "" for p in pieces[:-1])


def test_incremental_decoder_special_tokens():
    t = Tokenizer.gpt2()
    t.add_special_tokens(["<|eot_id|>"])
    eot = t.token_to_id("<|eot_id|>")
    ids = t.encode("ok 😀") + [eot]
    dec = IncrementalDecoder(t)
    assert "".join(dec.push(i) for i in ids) == "ok 😀<|eot_id|>"
    dec = IncrementalDecoder(t, skip_special_tokens=True)
    assert "".join(dec.push(i) for i in ids) == "ok 😀"


def test_save_and_from_dir_round_trip(saved):
    t, d = saved
    for name in ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (d / name).is_file(), name
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "GPT2Tokenizer"
    assert cfg["eos_token"] == cfg["bos_token"] == cfg["unk_token"] == "<|endoftext|>"
    assert cfg["pad_token"] == "<|pad|>"
    assert cfg["gpt2chat_template"] == "demo"
    assert "chat_template" in cfg and cfg["model_max_length"] == 1024
    assert cfg["added_tokens_decoder"][str(t.token_to_id("<|eot_id|>"))]["special"] is True
    t2 = Tokenizer.from_dir(d)
    assert len(t2) == len(t)
    assert t2.template_name == "demo"
    assert t2.chat_template == cfg["chat_template"]
    assert t2.special_token_ids == t.special_token_ids
    assert t2.pad_token_id == t.pad_token_id and t2.eos_token_id == 50256
    for text in SAMPLES:
        assert t2.encode(text) == t.encode(text)
    vocab = json.loads((d / "vocab.json").read_text())
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256
    merges = (d / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) == 50001


def test_transformers_loads_saved_folder(saved):
    transformers = pytest.importorskip("transformers")
    t, d = saved
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert len(hf) == len(t)
    assert hf.eos_token_id == 50256 and hf.pad_token_id == t.pad_token_id
    for s in ["<|endoftext|>", "<|pad|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]:
        assert hf.convert_tokens_to_ids(s) == t.token_to_id(s), s
    assert set(hf.all_special_ids) == t.special_token_ids
    for text in SAMPLES:
        if "<|" in text:
            continue
        assert hf(text)["input_ids"] == t.encode(text), text
    # and their save loads back in ours
    d2 = d.parent / (d.name + "-hf")
    hf.save_pretrained(str(d2))
    t3 = Tokenizer.from_dir(d2)  # transformers 5 writes the template to chat_template.jinja
    assert t3.chat_template == t.chat_template and t3.template_name == "demo"
    assert t3.special_token_ids == t.special_token_ids
    assert t3.encode(SAMPLES[2]) == t.encode(SAMPLES[2])


def test_from_dir_bad_input(tmp_path, saved):
    _, good = saved
    with pytest.raises(Gpt2ChatError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(Gpt2ChatError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(Gpt2ChatError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(good / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[[[")
    with pytest.raises(Gpt2ChatError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_adds_pad_when_missing(tmp_path):
    """A plain GPT-2 tokenizer.json (only <|endoftext|> added) gets <|pad|> at 50257."""
    from tokenizers import Tokenizer as Rust

    t = Tokenizer.gpt2()
    data = json.loads(t.backend.to_str())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] == "<|endoftext|>"]
    Rust.from_str(json.dumps(data)).save(str(tmp_path / "tokenizer.json"))
    t2 = Tokenizer.from_dir(tmp_path)
    assert t2.pad_token_id == 50257 and len(t2) == 50258


def test_type_errors(tok):
    with pytest.raises(TypeError):
        tok.encode(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tok.encode_batch(["a", 3])  # type: ignore[list-item]


TRICKY_TEXTS = [
    "", " ", "  ", "\n\n", "a\n\nb", "Hello  world\t\t!", "  leading and trailing  ", "\r\n\r\nx",
    "it's they're we've I'm you'll he'd IT'S", "数字123 ١٢٣ and ½ ⅓", "emoji 👩‍👩‍👧 end", "tab\tsep\u00a0nbsp",
    "x" * 3000, "<|eot_id|> stays text <|endoftext|>", "trailing spaces   \n   ", "$$$ ---- ...",
]


def test_fast_plain_encoder_matches_the_tokenizers_path():
    """tiktoken (used by encode/encode_batch for GPT-2's vocab) gives the ids of the `tokenizers` BPE."""
    tok = Tokenizer.gpt2()
    assert tok._fast is not None, "GPT-2 vocabulary should use the fast plain encoder"
    slow = [tok._plain.encode(t, add_special_tokens=False).ids for t in TRICKY_TEXTS]
    assert [tok.encode(t) for t in TRICKY_TEXTS] == slow
    assert tok.encode_batch(TRICKY_TEXTS) == slow


def test_fast_plain_encoder_on_real_text(shared_dir):
    rows = [json.loads(line) for line in (shared_dir / "data/oasst1/en-validation.jsonl").open()][:400]
    texts = [r["text"] for r in rows]
    tok = Tokenizer.gpt2()
    assert tok.encode_batch(texts) == [e.ids for e in tok._plain.encode_batch(texts, add_special_tokens=False)]
