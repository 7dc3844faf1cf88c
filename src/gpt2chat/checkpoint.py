"""Checkpoint folders in Hugging Face's layout: load, save, make a random one, resolve hub ids.

Why one module of ~430 lines (over ~400): loading, hub resolution, saving and init all read or write
the one folder format, and keeping them together keeps that format in one place.

A folder holds `config.json` (model_type gpt2 / gpt_neo), `model.safetensors` with HF tensor names (GPT-2's
Conv1D weights are [in, out]; ours are nn.Linear [out, in], so they are transposed here and only here),
`generation_config.json` and the tokenizer files written by `Tokenizer.save`. `transformers` loads it with
`AutoModelForCausalLM` / `AutoTokenizer`; we load what `transformers` writes, sharded safetensors, and
`pytorch_model.bin` (tensors only, `weights_only=True`: no pickled code ever runs).

Everything read from disk or the hub is checked; problems raise `CheckpointError` naming the file and the
tensor. This module knows nothing about training, sampling or chat.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2chat.atomic_files import write_atomic, write_json_atomic
from gpt2chat.config import ConfigError, ModelConfig, get_preset
from gpt2chat.device import model_device_dtype
from gpt2chat.errors import Gpt2ChatError

if TYPE_CHECKING:
    import torch

    from gpt2chat.model import GPT
    from gpt2chat.tokenizer import Tokenizer

__all__ = ["CheckpointError", "load_model", "save_pretrained", "init_checkpoint", "resolve_checkpoint"]

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja")  # fmt: skip
HUB_PATTERNS = ["config.json", "generation_config.json", *TOKENIZER_FILES]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
HUB_TIMEOUT_S = 10.0
MAKE_ONE = "point --model at a local folder, or make one with `gpt2chat init --arch gpt2 --out DIR`"


class CheckpointError(Gpt2ChatError):
    """A checkpoint folder or hub id that cannot be loaded or written; the message names the file."""


# ---------------------------------------------------------------------------------------------- resolve
def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub id downloaded (cache first, then online unless offline)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder; {MAKE_ONE}")
    looks_like_path = (
        text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or "\\" in text or text.count("/") > 1
        or (os.altsep is not None and os.altsep in text) or not HUB_ID.match(text)
    )  # fmt: skip
    if looks_like_path:
        raise CheckpointError(f"no such folder: {path}; {MAKE_ONE}")
    return _from_hub(text)


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """Run fn in a daemon thread; give up waiting after `seconds` (a stuck socket must not hang us)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="gpt2chat-hub")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _from_hub(repo_id: str) -> Path:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(HUB_TIMEOUT_S)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(HUB_TIMEOUT_S)))
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{repo_id!r} is not a local folder and huggingface_hub is missing; {MAKE_ONE}") from exc

    def download(patterns: list[str], local_only: bool) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only,
                                      etag_timeout=HUB_TIMEOUT_S))  # fmt: skip

    safetensors = [*HUB_PATTERNS, "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    pickled = [*HUB_PATTERNS, "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
    try:  # the local cache first: no network at all
        folder = download(safetensors, local_only=True)
        if _has_weights(folder):
            return folder
    except Exception:  # noqa: BLE001 - not cached: try online below
        pass
    if _hub_offline():
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and is not in the Hugging Face cache, and the hub is off "
            f"(HF_HUB_OFFLINE is set); {MAKE_ONE}"
        )
    try:
        _with_deadline(lambda: HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S), HUB_TIMEOUT_S * 1.5)
        folder = download(safetensors, local_only=False)
        if not _has_weights(folder):
            folder = download(pickled, local_only=False)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear message
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face hub (the hub could not be reached or has no "
            f"such model: {type(exc).__name__}: {str(exc)[:200]}); {MAKE_ONE}"
        ) from exc
    if not _has_weights(folder):
        raise CheckpointError(f"hub model {repo_id!r} has no model.safetensors or pytorch_model.bin; {MAKE_ONE}")
    return folder


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


# ---------------------------------------------------------------------------------------------- load
def load_model(
    name_or_path: str | os.PathLike, device: str | torch.device | None = None, dtype: Any = None
) -> tuple[GPT, Tokenizer]:
    """Load (model, tokenizer) from a checkpoint folder or hub id; model in eval mode on device / dtype
    (default: `gpt2chat.device`'s policy, CUDA in bf16 when present, else CPU in fp32)."""
    import torch

    from gpt2chat.device import device_and_dtype
    from gpt2chat.model import GPT

    folder = resolve_checkpoint(name_or_path)
    config = read_config(folder)
    device, torch_dtype = device_and_dtype(device, dtype)
    state = _read_weights(folder)
    with torch.device("meta"):
        model = GPT(config)
    _load_hf_state(model, state, folder, torch_dtype)
    tokenizer = _load_tokenizer(folder)
    _match_vocab(model, tokenizer, folder)
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    return model, tokenizer


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (its config.json)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {Path(folder)} is not a checkpoint folder ({MAKE_ONE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return ModelConfig.from_hf_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except (TypeError, ValueError) as exc:  # a field of the wrong JSON type (float("abc"), float([1]))
        raise CheckpointError(f"{path}: bad value ({exc})") from exc


def _read_weights(folder: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """All tensors of the folder's weight files: name -> (tensor on CPU, the file it came from)."""
    for name in WEIGHT_FILES:  # in order of preference: one safetensors file first
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            return _read_sharded(folder, path)
        return {k: (v, path) for k, v in _read_file(path).items()}
    raise CheckpointError(
        f"{folder}: no weights (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _read_sharded(folder: Path, index: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a valid weight index ({exc})") from exc
    root = folder.resolve()
    tensors: dict[str, tuple[torch.Tensor, Path]] = {}
    for shard in shards:
        path = (folder / str(shard)).resolve()
        if not path.is_relative_to(root):
            raise CheckpointError(f"{index}: shard {shard!r} points outside the checkpoint folder")
        if not path.is_file():
            raise CheckpointError(f"{index}: shard file {shard!r} is missing")
        tensors.update({k: (v, folder / str(shard)) for k, v in _read_file(path).items()})
    return tensors


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, bad header ...
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError for code, RuntimeError for bad zip ...
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refused: the file holds pickled objects other than tensors (it could run code); "
                "only plain tensor state dicts are loaded"
            ) from exc
        raise CheckpointError(f"{path}: corrupt or unreadable PyTorch weights file ({exc})") from exc
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a dict of tensor names to tensors")
    return data


def _hf_name(key: str) -> str | None:
    """File key -> our state-dict key; None for keys to skip (attention mask buffers, tied head)."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-1] in ("bias", "masked_bias") and parts[-2] in ("attn", "attention"):
        return None  # HF's causal-mask buffers in old checkpoints
    if key == "lm_head.weight":
        return None  # tied to transformer.wte.weight
    return key if key.startswith("transformer.") else f"transformer.{key}"


def _load_hf_state(
    model: GPT, state: dict[str, tuple[torch.Tensor, Path]], folder: Path, dtype: torch.dtype
) -> None:
    """Check names and shapes against the (meta) model, transpose Conv1D, assign the tensors."""
    import torch

    is_gpt2 = model.config.model_type == "gpt2"
    found = {}
    for key, (tensor, source) in state.items():
        name = _hf_name(key)
        if name is not None:
            found[name] = (tensor, source)
    files = ", ".join(sorted({str(src.name) for _, src in state.values()})) or "weights"
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    loaded = {}
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"{folder / files}: tensor {name!r} is missing (config.json expects it)")
        tensor, source = found[name]
        transpose = is_gpt2 and name.endswith(CONV1D_SUFFIXES)
        want = tuple(reversed(shape)) if transpose else tuple(shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {list(tensor.shape)}, config.json implies {list(want)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())  # one read of the weights, before any use
        if bad:
            raise CheckpointError(f"{source}: tensor {name!r} has {bad} NaN / inf values of {tensor.numel()}; "
                                  "the weights are damaged (or the training diverged before this save)")
        tensor = tensor.t() if transpose else tensor
        # a copy always: safetensors' tensors are views of one file mapping, and one view kept as a parameter
        # keeps the whole file's pages resident beside the transposed copies (+320 MiB RSS for GPT-2 124M)
        loaded[name] = tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    loaded["lm_head.weight"] = loaded["transformer.wte.weight"]
    model.load_state_dict(loaded, strict=True, assign=True)
    model.tie_weights()


def _load_tokenizer(folder: Path) -> Tokenizer:
    from gpt2chat.tokenizer import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        return Tokenizer.gpt2()  # bare weights folder: GPT-2's own BPE
    try:
        return Tokenizer.from_dir(folder)
    except CheckpointError:
        raise
    except Gpt2ChatError as exc:
        raise CheckpointError(str(exc)) from exc


def _match_vocab(model: GPT, tokenizer: Tokenizer, folder: Path) -> None:
    """Every tokenizer id needs an embedding row. The pad token our tokenizer adds gets a new row."""
    rows = model.config.vocab_size
    if len(tokenizer) <= rows:
        return
    extra = [tokenizer.id_to_token(i) for i in range(rows, len(tokenizer))]
    from gpt2chat.tokenizer import PAD_TOKEN

    if extra == [PAD_TOKEN]:  # GPT-2 has no pad token: ours is added on load, give it a row
        model.resize_token_embeddings(len(tokenizer))
        return
    shown = ", ".join(repr(t) for t in extra[:5]) + (" ..." if len(extra) > 5 else "")
    raise CheckpointError(
        f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows "
        f"(config.json vocab_size); tokens without an embedding row: {shown}"
    )


# ---------------------------------------------------------------------------------------------- save
def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF names and layouts (Conv1D transposed, tied head left out), contiguous on CPU."""
    is_gpt2 = model.config.model_type == "gpt2"
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if is_gpt2 and name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[name] = tensor.to("cpu").contiguous()
    return out


def save_pretrained(
    model: GPT, tokenizer: Tokenizer, out_dir: str | os.PathLike, template: str | None = None
) -> Path:
    """Write a folder transformers loads: weights, config, generation config, tokenizer (+ chat template).

    `template` defaults to the tokenizer's own template name; its Jinja goes into tokenizer_config.json.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {config.vocab_size} rows; "
            "call model.resize_token_embeddings(len(tokenizer)) first"
        )
    template = template or tokenizer.template_name
    chat_template, stop_ids = None, []
    if template:
        chat_template, stop_ids = _template_parts(template, tokenizer)

    weights = hf_state_dict(model)
    write_atomic(out / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    if chat_template is not None:
        tokenizer.save(out, chat_template=chat_template, template_name=template)
    else:
        tokenizer.save(out)

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    dtype_name = str(model_device_dtype(model)[1]).removeprefix("torch.")
    hf_config = {**config.to_hf_dict(), "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad,
                 "dtype": dtype_name, "torch_dtype": dtype_name}  # fmt: skip
    eos_ids = [eos, *[i for i in stop_ids if i != eos]]
    generation = {"bos_token_id": eos, "eos_token_id": eos_ids if len(eos_ids) > 1 else eos, "pad_token_id": pad}
    write_json_atomic(out / "generation_config.json", generation)
    write_json_atomic(out / "config.json", dict(sorted(hf_config.items())))  # last: marks the folder complete
    return out


def _template_parts(name: str, tokenizer: Tokenizer) -> tuple[str, list[int]]:
    """The template's Jinja text and the ids of its stop tokens; every token must be in the tokenizer."""
    from gpt2chat.templates import get_template

    try:
        template = get_template(name)
    except Gpt2ChatError as exc:
        raise CheckpointError(str(exc)) from exc
    missing = [t for t in template.special_tokens if tokenizer.token_to_id(t) is None]
    if missing:
        raise CheckpointError(
            f"template {name!r} needs tokens the tokenizer lacks: {missing}; call "
            f"get_template({name!r}).ensure_tokens(tokenizer) and model.resize_token_embeddings(len(tokenizer))"
        )
    return template.jinja, template.stop_token_ids(tokenizer)


def init_checkpoint(
    arch: str, out_dir: str | os.PathLike, template: str = "llama3-context", seed: int = 0,
    std: float | None = None,
) -> Path:
    """A randomly initialised checkpoint folder: GPT-2 tokenizer + the template's tokens, preset shapes.

    `std` redraws the weights wider than GPT-2's init (0.02), with random biases and layer-norm gains, so
    the logits spread as a trained model's do (std 0.05: about +-2): agreement checks of exports and
    quantization on the 0.02 init's nearly flat logits would hide errors."""
    import torch

    from gpt2chat.model import GPT
    from gpt2chat.templates import get_template
    from gpt2chat.tokenizer import Tokenizer

    try:
        config = get_preset(arch)
        chat_template = get_template(template)
    except Gpt2ChatError as exc:
        raise CheckpointError(str(exc)) from exc
    tokenizer = Tokenizer.gpt2()
    chat_template.ensure_tokens(tokenizer)
    eos = tokenizer.eos_token_id
    config = config.replace(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
        if std is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0.0, 0.02)
                    elif ".ln_" in name:
                        p.normal_(1.0, 0.1)
                    else:
                        p.normal_(0.0, std)
    return save_pretrained(model, tokenizer, out_dir, template=template)
