"""Load benchmark of `gpt2chat serve`: 16 concurrent streaming clients against 1, on loopback.

For each model shape (random weights; default `gpt2` = the 124M shape) it writes a checkpoint, starts
`gpt2chat serve` as its own process on 127.0.0.1, warms it up, then for each concurrency level runs that
many clients, each making `--requests` streaming chat requests of `--max-tokens` tokens one after another
(bounded work). It reports aggregate completion tokens/s (sum of `usage.completion_tokens` over the wall
time of the level), time to first token (request sent -> first content chunk) p50 / p99, and errors (must
be 0), then the ratio of each level's tokens/s to the first level's. Targets: 16 concurrent 128-token
streams >= 8x one stream, TTFT p99 <= 1 s. One JSON line per level on stdout, a Markdown table at the end.

    python -m benchmarks.serve                       # 124M, 1 and 16 clients, 128-token replies
    python -m benchmarks.serve --shapes tiny --clients 1,4,16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serve_process import ServeProcess

PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def start_server(checkpoint: Path, log: Path, max_batch: int, device: str | None) -> ServeProcess:
    options = ["--max-batch", str(max_batch), "--max-queue", "64", "--max-tokens-limit", "1024"]
    if device:
        options += ["--device", device]
    return ServeProcess(checkpoint, log, *options, env={"GPT2CHAT_API_KEY": None}).wait_ready(timeout=300)


async def one_request(client: httpx.AsyncClient, max_tokens: int, seed: int,
                      temperature: float) -> tuple[int, float]:
    """One streaming chat request: (completion tokens, seconds to the first content chunk)."""
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stream": True,
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
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2", help="model presets, comma-separated (random weights)")
    parser.add_argument("--clients", default="1,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=2, help="streaming requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--device", default=None, help="the server's --device (default: cuda if present)")
    args = parser.parse_args()

    from gpt2chat.checkpoint import init_checkpoint

    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpt2chat-bench-") as tmp:
        for shape in args.shapes.split(","):
            checkpoint = init_checkpoint(shape, Path(tmp) / shape, seed=0)
            server = start_server(checkpoint, Path(tmp) / f"serve-{shape}.log", args.max_batch, args.device)
            url = server.url
            try:
                asyncio.run(run_level(url, 2, 1, 8, args.temperature))  # warm-up: first allocations, code paths
                for clients in levels:
                    row = {"shape": shape, "temperature": args.temperature, **asyncio.run(run_level(url, clients, args.requests, args.max_tokens,
                                                                   args.temperature))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                server.stop()

    print("\n| shape | clients | requests | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | errors | vs 1 client |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["clients"] == levels[0])
        ratio = row["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else float("nan")
        print(f"| {row['shape']} | {row['clients']} | {row['requests']} | {row['tokens_per_s']} | "
              f"{row['ttft_p50_ms']} | {row['ttft_p99_ms']} | {row['errors']} | {ratio:.2f}x |")
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
