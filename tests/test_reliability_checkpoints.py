"""Issue #14: damaged checkpoint folders through the CLI: one clear `error:` line naming the file, exit 2, no
traceback, nothing executed; and the permissions of everything a training run writes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2chat.checkpoint import init_checkpoint
from gpt2chat.cli import main
from gpt2chat.tokenizer import Tokenizer
from hostile_files import RunsCode  # unpickling it calls os.mkdir(marker)

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return init_checkpoint("tiny", tmp_path_factory.mktemp("good") / "tiny")


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def lying_header(folder: Path) -> None:
    """The header says the first tensor's bytes run 4 KiB further than the file holds."""
    data = (folder / WEIGHTS).read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4096
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size:])


def nan_weight(folder: Path) -> None:
    state = load_file(folder / WEIGHTS)
    state["transformer.h.1.mlp.c_proj.weight"][3, 5] = float("nan")
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})


def foreign_tokenizer(folder: Path) -> None:
    """A tokenizer with ids past the embedding's rows (another model's, with extra tokens)."""
    bigger = Tokenizer.from_dir(folder)
    bigger.add_special_tokens(["<|tool_call|>", "<|tool_result|>"])
    bigger.save(folder)


DAMAGES = {
    "truncated safetensors": (truncate, WEIGHTS, "corrupt or unreadable safetensors file"),
    "header lies about sizes": (lying_header, WEIGHTS, "corrupt or unreadable safetensors file"),
    "n_layer is a string": (lambda f: edit_config(f, n_layer="2"), "config.json",
                            "n_layer must be a positive integer, got '2'"),
    "n_inner is a boolean": (lambda f: edit_config(f, n_inner=True), "config.json",
                             "n_inner must be a positive integer or null, got True"),
    "epsilon is not a number": (lambda f: edit_config(f, layer_norm_epsilon="small"), "config.json",
                                "layer_norm_epsilon must be a number, got 'small'"),
    "eos id is a string": (lambda f: edit_config(f, eos_token_id="</s>"), "config.json",
                           "eos_token_id must be a token id"),
    "config is a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json",
                         "config must be a JSON object"),
    "tokenizer larger than the embedding": (foreign_tokenizer, "", "tokens without an embedding row: "
                                            "'<|tool_call|>', '<|tool_result|>'"),
    "NaN weights": (nan_weight, WEIGHTS, "tensor 'transformer.h.1.mlp.c_proj.weight' has 1 NaN / inf values"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_damaged_file_gives_one_clear_error_naming_it(tiny, tmp_path, capsys, damage):
    spoil, file_name, message = DAMAGES[damage]
    folder = Path(shutil.copytree(tiny, tmp_path / "damaged"))
    spoil(folder)
    code = main(["generate", "--model", str(folder), "--prompt", "Hello", "--max-new-tokens", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"error: {folder / file_name}") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tiny, tmp_path, capsys):
    folder = Path(shutil.copytree(tiny, tmp_path / "hostile"))
    state = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": RunsCode(str(marker))}, folder / "pytorch_model.bin")
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the payload is live: a plain unpickle runs it...
    assert marker.is_dir()
    marker.rmdir()
    code = main(["generate", "--model", str(folder), "--prompt", "Hello", "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {folder / 'pytorch_model.bin'}: refused") and "Traceback" not in err
    assert not marker.exists()  # ...and never under ours


def test_everything_a_training_run_writes_is_readable_by_others(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(["sft", "--model", "init:tiny", "--data", "sample", "--max-steps", "1", "--batch-size", "2",
                     "--max-length", "64", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    folders = [p for p in (tmp_path / "run").rglob("*") if p.is_dir()]
    names = {p.name for p in files}
    assert {"model.safetensors", "trainer_state.pt", "trainer_state.json", "tokenizer.json",
            "config.json"} <= names
    assert {p.relative_to(tmp_path): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
            if stat.S_IMODE(p.stat().st_mode) != 0o644} == {}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o755 for p in folders)
    assert not [p for p in files + folders if p.name.endswith(".tmp")]  # nothing half-written left visible
