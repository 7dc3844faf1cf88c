"""`gpt2chat init | generate | chat`: checkpoints, greedy output equal to transformers, bad input, a pty chat."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from gpt2chat.cli import main

PROMPT = "Hello, my name is"


def test_init_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert (
        main(["init", "--arch", "tiny-neo", "--out", str(out), "--template", "guanaco", "--seed", "3"]) == 0
    )
    assert str(out) in capsys.readouterr().out
    from gpt2chat.checkpoint import load_model

    model, tokenizer = load_model(out, device="cpu")
    assert model.config.model_type == "gpt_neo"
    assert tokenizer.template_name == "guanaco"


def test_init_never_replaces_a_folder_without_force(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["init", "--arch", "tiny", "--out", str(out), "--seed", "1"]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main(["init", "--arch", "tiny", "--out", str(out), "--seed", "2"]) == 2
    assert "already exists and is not empty; pass --force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before  # nothing lost
    assert main(["init", "--arch", "tiny", "--out", str(out), "--seed", "2", "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != before


def test_init_rejects_unknown_arch(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["init", "--arch", "gpt5", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_generate_greedy_equals_transformers(tiny_checkpoint, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    new_tokens = 20
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT,
                 "--max-new-tokens", str(new_tokens), "--temperature", "0"]) == 0  # fmt: skip
    ours = capsys.readouterr().out

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    ids = hf_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
    continuation = out[0, ids.shape[1] :].tolist()
    eos = hf_model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    if continuation and continuation[-1] in eos:  # we never print the stop token
        continuation = continuation[:-1]
    assert ours == hf_tokenizer.decode(continuation) + "\n"


def test_generate_seeded_sampling_repeats(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12",
            "--preset", "chat", "--seed", "11"]  # fmt: skip
    outputs = []
    for _ in range(2):
        assert main(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "1.5"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--top-k", "-2"], "top_k"),
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", "word " * 300], "tokens, but the model's context is 256"),
        (["--prompt", ""], "empty"),
    ],
)
def test_generate_bad_input_is_one_message(tiny_checkpoint, capsys, extra, message):
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_missing_model_folder_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2chat", "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_chat_bad_sampling_flag(tiny_checkpoint, capsys):
    assert main(["chat", "--model", str(tiny_checkpoint), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


# ---------------------------------------------------------------------- terminal chat through a pty


class Terminal:
    """A child process on a pseudo-terminal: type lines, read until a marker appears."""

    def __init__(self, argv, env):
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.buffer = ""

    def read_until(self, marker: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {marker!r}; screen so far:\n{self.buffer}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"terminal closed before {marker!r}; screen:\n{self.buffer}")
                self.buffer += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self.master)


@pytest.fixture
def chat_terminal(tiny_checkpoint):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "TERM": "dumb"}
    argv = [sys.executable, "-m", "gpt2chat", "chat", "--model", str(tiny_checkpoint), "--preset", "greedy",
            "--max-new-tokens", "8", "--system", "You are helpful."]  # fmt: skip
    terminal = Terminal(argv, env)
    yield terminal
    terminal.close()


def expected_replies(tiny_checkpoint, turns, system="You are helpful."):
    from gpt2chat.chat import ChatSession
    from gpt2chat.checkpoint import load_model
    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SAMPLING_PRESETS

    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    session = ChatSession(
        Engine(model), tokenizer, system=system, params=SAMPLING_PRESETS["greedy"].replace(max_new_tokens=8)
    )
    replies = []
    for turn in turns:
        if turn == "/reset":
            session.reset()
        else:
            replies.append("".join(session.send(turn)))
    return replies


def test_chat_in_a_terminal(chat_terminal, tiny_checkpoint):
    term = chat_terminal
    banner = term.read_until("you> ")
    assert "/reset" in banner and "/exit" in banner
    replies = []
    for line in ("Hello there", "Tell me more", "/reset", "Hello there"):
        term.type(line + "\n")
        if line == "/reset":
            assert "conversation cleared" in term.read_until("you> ")
            continue
        term.read_until("assistant> ")
        replies.append(term.read_until("\nyou> "))
    # streamed replies equal a ChatSession's greedy replies: history carried, then cleared by /reset
    assert replies == expected_replies(
        tiny_checkpoint, ["Hello there", "Tell me more", "/reset", "Hello there"]
    )
    assert replies[0] == replies[2]

    term.type("/system Talk like a pirate.\n")
    assert "system message set" in term.read_until("you> ")
    term.type("/bogus\n")
    assert "unknown command" in term.read_until("you> ")
    term.type("\x04")  # Ctrl-D: end of input exits cleanly
    assert term.proc.wait(timeout=60) == 0
    assert "Traceback" not in term.buffer


def test_chat_exit_command_in_process(tiny_checkpoint, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\n\n/system\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(tiny_checkpoint), "--preset", "greedy", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "system message cleared" in out
    assert "assistant>" not in out  # /exit stopped before the last line was sent


def test_chat_says_when_old_turns_were_dropped_to_fit(tiny_checkpoint, monkeypatch, capsys):
    import io

    long_line = "tell me about the sea and the ships on it " * 8  # ~80 tokens: three turns overflow 256
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n" + f"{long_line}\n" * 3 + "/exit\n"))
    assert main(["chat", "--model", str(tiny_checkpoint), "--preset", "greedy", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if "no longer fit the model's context of 256 tokens" in line]
    assert notices, out  # the user is told, not left to wonder why the model forgot
    assert out.index(notices[0]) > out.index("assistant>")  # not before the first turns, which fitted


# ---------------------------------------------------------------------- --quantize


@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_generate_quantized_prints_what_the_quantized_engine_makes(tiny_checkpoint, capsys, mode):
    from gpt2chat.engine import Engine
    from gpt2chat.quantize import load_for_inference, weight_format
    from gpt2chat.reply_text import stop_token_ids
    from gpt2chat.sampling import SamplingParams

    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12",
                 "--temperature", "0", "--quantize", mode]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    model, tokenizer = load_for_inference(tiny_checkpoint, quantize=mode, device="cpu")
    assert weight_format(model) == mode
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=stop_token_ids(tokenizer))
    (result,) = Engine(model).generate([tokenizer.encode(PROMPT)], params)
    assert printed == tokenizer.decode(result.token_ids) + "\n"


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int8", "--device", "cuda"], "int8 is implemented for the CPU only"),
    (["--quantize", "fp16", "--dtype", "bfloat16"], "cannot compute in bfloat16"),
])
def test_a_quantize_mode_the_device_cannot_do_is_one_clear_error(tiny_checkpoint, capsys, command, extra, message):
    argv = [command, "--model", str(tiny_checkpoint), *extra] + (["--prompt", PROMPT] if command == "generate" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
