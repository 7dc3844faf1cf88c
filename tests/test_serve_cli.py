"""`gpt2chat serve` as a user runs it: a real process on 127.0.0.1 with the tiny checkpoint, the API key
from the environment, and clear one-line errors (exit 2) for bad options."""

from __future__ import annotations

import httpx
import pytest

from benchmarks.serve_process import ServeProcess
from gpt2chat.cli import main


@pytest.mark.slow  # a fresh interpreter importing torch: ~10 s idle, much more on a loaded machine
def test_serve_process_listens_on_loopback_and_takes_the_key_from_the_environment(tiny_checkpoint, tmp_path):
    with ServeProcess(tiny_checkpoint, tmp_path / "serve.log", "--max-batch", "2", "--device", "cpu",
                      env={"GPT2CHAT_API_KEY": "env-key"}) as server:
        url = server.url
        server.wait_ready(timeout=120)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer env-key"}).json()
        assert models["data"][0]["id"] == tiny_checkpoint.name
        reply = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer env-key"}, timeout=60,
                           json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4
        # bound to 127.0.0.1 only: another address of the host (127.0.0.2 also reaches this machine, and a
        # server on 0.0.0.0 would answer there) is refused
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.2:{server.port}/health", timeout=5)


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-tokens-limit", "0"], "--max-tokens-limit"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--max-body-bytes", "10"], "--max-body-bytes"),
])
def test_bad_serve_options_are_one_line_errors(argv, message, tiny_checkpoint, capsys):
    assert main(["serve", "--model", str(tiny_checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nothing-here")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_serve_options_build_a_quantized_service_that_answers(tiny_checkpoint):
    import asyncio

    from gpt2chat.cli import build_parser
    from gpt2chat.cli.serve import _build_service
    from gpt2chat.quantize import weight_format

    args = build_parser().parse_args(["serve", "--model", str(tiny_checkpoint), "--quantize", "int8",
                                      "--max-batch", "2", "--device", "cpu"])
    service = _build_service(args)
    try:
        assert weight_format(service.model) == "int8" and service.limits.max_batch_size == 2

        async def reply():
            ids = service.render_messages([{"role": "user", "content": "Hi"}])
            (generation,) = service.start(ids, service.settings(len(ids), 4, temperature=0))
            return await generation.text(), generation

        text, generation = asyncio.run(reply())
        assert 1 <= generation.completion_tokens <= 4 and generation.finish_reason in ("stop", "length")
    finally:
        service.close()


def test_the_served_name_is_the_run_for_a_final_folder_and_the_hub_id_as_given(tmp_path):
    from gpt2chat.cli.serve import served_name

    for folder, name in [(tmp_path / "sft-tiny" / "final", "sft-tiny"), (tmp_path / "dpo" / "adapter", "dpo"),
                         (tmp_path / "my-model", "my-model")]:
        folder.mkdir(parents=True)
        assert served_name(str(folder) + "/", folder) == name
    assert served_name("openai-community/gpt2", tmp_path / "hub-cache" / "snapshot") == "openai-community/gpt2"


def test_model_name_flag_names_the_served_model(tiny_checkpoint):
    from gpt2chat.cli import build_parser
    from gpt2chat.cli.serve import _build_service

    args = build_parser().parse_args(["serve", "--model", str(tiny_checkpoint), "--model-name", "helper-7",
                                      "--device", "cpu"])
    service = _build_service(args, args.model_name)
    try:
        assert service.model_name == "helper-7"
    finally:
        service.close()
