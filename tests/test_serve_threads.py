"""`gpt2chat serve --threads N`: the engine's torch threads (llama-server's -t), refused below 1 before loading."""

from __future__ import annotations

import pytest
import torch

from gpt2chat.errors import Gpt2ChatError


def test_threads_sets_torch_threads_and_a_bad_count_is_refused_before_loading(tiny_checkpoint, tmp_path):
    from gpt2chat.cli import build_parser
    from gpt2chat.cli.serve import build_server

    parser = build_parser()
    common = ["serve", "--device", "cpu", "--max-batch", "1"]
    with pytest.raises(Gpt2ChatError, match="--threads must be at least 1, got 0"):
        build_server(parser.parse_args([*common, "--model", str(tmp_path / "missing"), "--threads", "0"]))
    before = torch.get_num_threads()
    try:
        server, service = build_server(parser.parse_args([*common, "--model", str(tiny_checkpoint), "--threads", "1"]))
        service.close()
        assert torch.get_num_threads() == 1
        assert parser.parse_args([*common, "--model", "m"]).threads is None  # default: torch's own choice
    finally:
        torch.set_num_threads(before)
