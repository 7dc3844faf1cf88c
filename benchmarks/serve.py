"""Serving benchmark: `gpt2chat serve` against llama-server on the same weights, in one run, interleaved.

One random checkpoint (default the GPT-2 124M shape) is served four ways, all servers up at once and idle
while another is measured: ours fp32 and `--quantize int8`, and llama-server (`-c 16384 -np 16 -t 2 --jinja`,
its prompt cache on by default) on our own `gpt2chat export --format gguf` of it, `--type f32` and `q8_0`.
Each round measures every side in turn (the order rotates): 1 and 16 concurrent streaming chat requests
of `--max-tokens` tokens (aggregate completion tokens/s from `usage`, time to first token p50 / p99), and a
7-turn conversation that resends the whole history each turn, asking for 1 token (TTFT per turn). Medians
over rounds; ratios ours / peer at the same precision. One JSON line per measure, Markdown tables at the end.
llama-server comes from `benchmarks/build_llama_server.sh` (cached outside the repo); where it is missing
its rows are skipped with a note.

    python -m benchmarks.serve --rounds 3
    python -m benchmarks.serve --shape tiny --rounds 1 --max-tokens 32     # a quick look
    python -m benchmarks.serve --single --precisions int8 --rounds 3        # where a single stream goes

`--single` measures one stream only, three ways interleaved in each round: the engine alone in this process
(`benchmarks.engine.one_stream_as_served`: the server's `BatchedEngine`, temperature 1, timed from submit),
ours over HTTP, llama-server over HTTP; for ours it also reads the CPU seconds each of the server's threads
spent (/proc/PID/task: the event loop is the main thread, the engine's thread and torch's workers the
others) and this client's, per token, so the path from engine to socket is measured, not guessed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serve_process import ServeProcess, free_port

LLAMA_SERVER = Path(os.environ.get("GPT2CHAT_LLAMA_SERVER", Path.home() / ".cache/gpt2chat-ci/llama-server-0.3.36/bin/llama-server"))
PEER_FLAGS = ["-c", "16384", "-np", "16", "-t", "2", "--jinja"]
# a conversation's turns: each user message ~60 tokens, each (fixed) assistant reply ~60 tokens
TURN = ("Tell me more about the lighthouse, the keeper's daily routine, the lamp, the fog horn, the supply "
        "boat that comes once a month and the gulls that nest on the rocks below the tower, please. ")
ANSWER = ("The keeper climbs the stairs at dusk, trims the wick, winds the clockwork that turns the lens, "
          "logs the weather every four hours and listens for ships through the long foggy night. ")

PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class LlamaServer:
    """llama-server on a GGUF file, on a free loopback port, until `stop()`."""

    def __init__(self, gguf: Path, log_path: Path):
        self.port = free_port()
        self.log = log_path.open("w")
        self.process = subprocess.Popen([str(LLAMA_SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port",
                                         str(self.port), *PEER_FLAGS], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("llama-server did not come up in 300 s")
            time.sleep(0.5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def start_ours(checkpoint: Path, log: Path, max_batch: int, device: str | None, quantize: str | None):
    options = ["--max-batch", str(max_batch), "--max-queue", "64", "--max-tokens-limit", "1024"]
    if device:
        options += ["--device", device]
    if quantize:
        options += ["--quantize", quantize]
    return ServeProcess(checkpoint, log, *options, env={"GPT2CHAT_API_KEY": None}).wait_ready(timeout=300)


def export_gguf(checkpoint: Path, out: Path, weight_type: str) -> Path:
    subprocess.run([sys.executable, "-m", "gpt2chat", "export", "--model", str(checkpoint), "--format", "gguf",
                    "--type", weight_type, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


async def conversation(url: str, turns: int) -> list[float]:
    """TTFT (ms) of each turn of a chat that resends its whole history and asks for one token."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    ttfts = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Turn {turn + 1}. {TURN}"})
            _, ttft = await one_request(client, 1, turn, 1.0, messages)
            ttfts.append(round(1000 * ttft, 1))
            messages.append({"role": "assistant", "content": ANSWER})
    return ttfts


async def one_request(client: httpx.AsyncClient, max_tokens: int, seed: int,
                      temperature: float, messages: list[dict] = PROMPT) -> tuple[int, float]:
    """One streaming chat request: (completion tokens, seconds to the first content chunk)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and (chunk["choices"][0]["delta"].get("content")
                                                       or chunk["choices"][0].get("finish_reason")):
                first = time.perf_counter() - sent
    return tokens, first if first is not None else time.perf_counter() - sent


async def run_level(url: str, clients: int, requests: int, max_tokens: int, temperature: float) -> dict:
    ttfts: list[float] = []
    errors: list[str] = []
    total_tokens = 0

    async def client_loop(index: int) -> None:
        nonlocal total_tokens
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for r in range(requests):
                try:
                    tokens, ttft = await one_request(client, max_tokens, index * 1000 + r, temperature)
                    total_tokens += tokens
                    ttfts.append(ttft)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(str(exc))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": clients * requests, "completion_tokens": total_tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(total_tokens / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
            "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1) if ttfts else None,
            "errors": len(errors), "first_error": errors[0] if errors else None}


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def single_stream(args, servers: dict, checkpoint: Path, precisions: list[str]) -> int:
    """`--single`: engine alone / ours served / llama-server, one stream, interleaved rounds."""
    from benchmarks.engine import one_stream_as_served
    from gpt2chat.engine import BatchedEngine
    from gpt2chat.quantize import load_for_inference

    engines = {}
    for precision in precisions:
        model, _ = load_for_inference(checkpoint, quantize=None if precision == "fp32" else precision)
        engines[precision] = BatchedEngine(model, max_batch_size=args.max_batch)
        one_stream_as_served(model, 8, 1, engines[precision])  # warm-up
    rows: dict[tuple[str, str], list[float]] = {}
    try:
        for round_index in range(args.rounds):
            sides = [("engine alone", p) for p in precisions] + list(servers)
            shift = round_index % len(sides)
            for side in sides[shift:] + sides[:shift]:
                row = {"round": round_index, "side": side[0], "precision": side[1],
                       "load_avg_1m": round(os.getloadavg()[0], 2)}
                if side[0] == "engine alone":
                    engine = engines[side[1]]
                    row["tokens_per_s"] = round(one_stream_as_served(None, args.max_tokens, 1, engine)["tokens_per_s"], 1)
                else:
                    server = servers[side]
                    pid = server.process.pid
                    before, client_before = thread_cpu(pid), time.thread_time()
                    level = asyncio.run(run_level(server.url, 1, 1, args.max_tokens, 1.0))
                    after, client = thread_cpu(pid), time.thread_time() - client_before
                    tokens = max(1, level["completion_tokens"])
                    row |= {"tokens_per_s": level["tokens_per_s"], "ttft_ms": level["ttft_p50_ms"],
                            "client_cpu_ms_per_token": round(1000 * client / tokens, 3)}
                    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
                    if side[0] == "ours":
                        row["event_loop_cpu_ms_per_token"] = round(1000 * spent.pop(pid, 0.0) / tokens, 3)
                        row["other_threads_cpu_ms_per_token"] = sorted(
                            (round(1000 * v / tokens, 3) for v in spent.values() if v > 0), reverse=True)
                    else:
                        row["process_cpu_ms_per_token"] = round(1000 * sum(spent.values()) / tokens, 3)
                    row["wall_ms_per_token"] = round(1000 * level["wall_s"] / tokens, 3)
                rows.setdefault(side, []).append(row["tokens_per_s"])
                print(json.dumps(row), flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    print("\n| side | precision | 1 stream tok/s (median) | / engine alone |")
    print("|---|---|---|---|")
    for side, rates in rows.items():
        alone = statistics.median(rows[("engine alone", side[1])])
        print(f"| {side[0]} | {side[1]} | {statistics.median(rates):.1f} | {statistics.median(rates) / alone:.2f} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="gpt2", help="model preset (random weights)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    parser.add_argument("--requests", type=int, default=1, help="streaming requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    parser.add_argument("--turns", type=int, default=7, help="turns of the conversation")
    parser.add_argument("--precisions", default="fp32,int8", help="fp32 (vs f32) and/or int8 (vs q8_0)")
    parser.add_argument("--max-batch", type=int, default=16, help="our server's --max-batch")
    parser.add_argument("--device", default=None, help="our server's --device (default: cuda if present)")
    parser.add_argument("--single", action="store_true", help="1 stream only: engine alone / ours / llama-server")
    args = parser.parse_args()

    from gpt2chat.checkpoint import init_checkpoint

    peers = {"fp32": ("f32", None), "int8": ("q8_0", "int8")}
    precisions = args.precisions.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="gpt2chat-bench-") as tmp:
        checkpoint = init_checkpoint(args.shape, Path(tmp) / args.shape, seed=0)
        servers = {}
        try:
            for precision in precisions:
                gguf_type, quantize = peers[precision]
                servers[("ours", precision)] = start_ours(checkpoint, Path(tmp) / f"ours-{precision}.log",
                                                          args.max_batch, args.device, quantize)
                if LLAMA_SERVER.exists():
                    gguf = export_gguf(checkpoint, Path(tmp) / f"model-{gguf_type}.gguf", gguf_type)
                    servers[("llama-server", precision)] = LlamaServer(gguf, Path(tmp) / f"llama-{gguf_type}.log")
            if not LLAMA_SERVER.exists():
                print(f"note: no llama-server at {LLAMA_SERVER} (run benchmarks/build_llama_server.sh): its rows "
                      "are skipped", file=sys.stderr)
            for server in servers.values():
                asyncio.run(run_level(server.url, 2, 1, 8, 1.0))  # warm-up: first allocations, code paths
            if args.single:
                return single_stream(args, servers, checkpoint, precisions)
            sides = list(servers)
            for round_index in range(args.rounds):
                shift = round_index % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    url = servers[side].url
                    row = {"round": round_index, "side": side[0], "precision": side[1]}
                    for clients in (1, 16):
                        row[f"s{clients}"] = asyncio.run(run_level(url, clients, args.requests, args.max_tokens, 1.0))
                    row["turns_ttft_ms"] = asyncio.run(conversation(url, args.turns))
                    results.setdefault(side, []).append(row)
                    print(json.dumps(row), flush=True)
        finally:
            for server in servers.values():
                server.stop()
    return report(results, precisions)


def report(results: dict, precisions: list[str]) -> int:
    def med(side, key, field):
        return statistics.median(r[key][field] for r in results[side])

    print("\n| side | precision | 1 stream tok/s | 16 streams tok/s | 16 TTFT p50 (ms) | 16 TTFT p99 (ms) | errors |")
    print("|---|---|---|---|---|---|---|")
    for side in results:
        errors = sum(r[k]["errors"] for r in results[side] for k in ("s1", "s16"))
        print(f"| {side[0]} | {side[1]} | {med(side, 's1', 'tokens_per_s'):.1f} | {med(side, 's16', 'tokens_per_s'):.1f} "
              f"| {med(side, 's16', 'ttft_p50_ms'):.0f} | {med(side, 's16', 'ttft_p99_ms'):.0f} | {errors} |")
    print("\n| side | precision | TTFT per turn (ms, median over rounds) |")
    print("|---|---|---|")
    for side in results:
        turns = zip(*(r["turns_ttft_ms"] for r in results[side]), strict=True)
        print(f"| {side[0]} | {side[1]} | {' / '.join(f'{statistics.median(t):.0f}' for t in turns)} |")
    print("\n| precision | 1 stream | 16 streams | 16 TTFT p99 | last-turn TTFT | ours: last / 2nd turn |")
    print("|---|---|---|---|---|---|")
    for precision in precisions:
        ours, peer = ("ours", precision), ("llama-server", precision)
        if peer not in results:
            continue
        last = [statistics.median(r["turns_ttft_ms"][-1] for r in results[s]) for s in (ours, peer)]
        second = statistics.median(r["turns_ttft_ms"][1] for r in results[ours])
        print(f"| {precision} | {med(ours, 's1', 'tokens_per_s') / med(peer, 's1', 'tokens_per_s'):.2f}x "
              f"| {med(ours, 's16', 'tokens_per_s') / med(peer, 's16', 'tokens_per_s'):.2f}x "
              f"| {med(ours, 's16', 'ttft_p99_ms') / med(peer, 's16', 'ttft_p99_ms'):.2f}x "
              f"| {last[0] / last[1]:.2f}x | {last[0] / second:.2f} |")
    errors = sum(r[k]["errors"] for rows in results.values() for r in rows for k in ("s1", "s16"))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
