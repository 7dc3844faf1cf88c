"""Soak (issue #14): 64 concurrent streaming clients on loopback against the real batched engine on the tiny
model, a bounded number of requests, about a third of them disconnecting at a random point: on connect
(before the server has read the request, or while it is queued or prefilling), after the role chunk and
before the first token, or mid-stream after a few tokens. The clients' choices come from one seeded
generator, so a run is repeatable in what each client does (not in the server's interleaving). Each
prefill forward is slowed by PREFILL_DELAY_S, so that leaving clients find their requests queued, being
prefilled and decoding: the test records which (the figure), and asks for some before the first token and
some after.

Afterwards: every engine request is finished (none with an error), only requests whose client left are
cancelled, no request is outstanding or waiting, every cache row is free, and a normal request is still
answered. Memory is read three ways, each after garbage collection (`settled_memory`): resident memory
after malloc_trim, the bytes C's allocator has handed out and not had back (glibc's mallinfo2, every
arena: tensors, buffers) and the objects Python's collector tracks. Resident memory must be back within
RSS_BOUND_MIB of where it stood after a warm-up (every row at once with the longest prompt and reply, so
that the cache, which grows on demand, reaches its full shape; then one request per client): what is
measured is what the soak leaves behind, not what first use allocates. A second soak then follows the
first: a leak grows with it, first uses of code paths do not, so what it adds to allocated bytes and
objects is bounded per request. Resident memory also holds free memory the allocators keep for reuse,
which rises once to a plateau and moves by several MiB between soaks, so it is no leak signal at 128
requests. `GPT2CHAT_SOAK_ROUNDS` sets the requests per client (2 by default: 2 x 128 requests). The slow
variant runs two soaks of 20 per client (1280 requests each) and bounds resident growth too.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpt2chat.engine.request import Request
from gpt2chat.serve.app import create_app
from serve_support import ServerThread, tiny_service, wait_until

CLIENTS = 64
ROWS = 16  # cache rows for 64 clients: most requests queue, so disconnects land in the queue, in prefill, mid-stream
ROUNDS = int(os.environ.get("GPT2CHAT_SOAK_ROUNDS", "2"))
PREFILL_DELAY_S = 0.05
MAX_WORDS, MAX_TOKENS = 60, 12  # a prompt of a few to ~70 tokens, a reply of 2 to 12
_PROTOCOLS = (H11Protocol,)  # the one ServerThread runs (uvicorn picks h11 without httptools)
WORDS = "the cat sat on a mat while every dog in town ran past her house at night".split()
RSS_PLATEAU_MIB = 32  # after 1280 requests (the allocators' one-time rise to their plateau; see settled_memory)
# Resident memory after 128 requests may exceed the warm baseline by at most this. The allocators' one-time
# rise can come that early: run after the rest of the suite in one process it measured +22 MiB with allocated
# bytes +1 MiB and objects flat (alone: +1-3 MiB), so the bound is the plateau's; a leak shows in the second
# soak's growth checks (objects, allocated bytes), which stay as tight as before.
RSS_BOUND_MIB = RSS_PLATEAU_MIB
# What a soak may add to the one before it (first uses of code paths are made by then: a leak grows, they do not):
GROWTH_OBJECTS_PER_REQUEST = 0.5  # tracked Python objects: a leak of one container per request is twice this
GROWTH_IN_USE_MIB = 1  # allocated C memory: 128 requests leaking 8 KiB each is 1 MiB
GROWTH_RSS_MIB = 12  # resident, after 1280 requests: a 10 KiB/request leak adds 12.5


@dataclass(frozen=True)
class Memory:
    rss_mib: float  # resident, after malloc_trim
    in_use_mib: float | None  # what C's allocator has handed out and not had back (None without glibc's mallinfo2)
    objects: int  # objects Python's garbage collector tracks

    def over(self, base: Memory) -> str:
        in_use = "n/a" if self.in_use_mib is None else f"{self.in_use_mib - base.in_use_mib:+.1f} MiB"
        return (f"RSS {self.rss_mib - base.rss_mib:+.1f} MiB, allocated {in_use}, "
                f"objects {self.objects - base.objects:+d}")


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33, struct mallinfo2 (malloc.h)
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):  # not glibc, or glibc before 2.33
    _LIBC = None


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _open_connections() -> bool:
    """Whether uvicorn still holds a connection's protocol object: one whose client dropped the connection
    (a reset, not a clean close) is kept, with its last request's scope, by its keep-alive timer until that
    fires (uvicorn's timeout_keep_alive, 5 s). Transient, and not what the soak measures."""
    gc.collect()  # a closed connection's protocol may sit in a reference cycle
    return any(type(obj) in _PROTOCOLS for obj in gc.get_objects())  # type(): isinstance wakes lazy modules


def settled_memory() -> Memory:
    """Memory once uvicorn has let go of closed connections, garbage is collected and glibc has handed its
    free pages back (malloc_trim). Measured (docs/RELIABILITY.md): without the trim, free memory glibc keeps
    for reuse adds a few MiB per hundred requests; with it, resident memory still rises once, by up to ~22
    MiB over the first thousand requests, and then stays (a second soak of 1280 adds under 1 MiB), while
    allocated bytes and tracked objects stay flat: free memory glibc keeps in a thread arena (the trim
    returns free chunks in its bins, not its top), not a leak."""
    assert wait_until(lambda: not _open_connections(), timeout=15, interval=0.25), "uvicorn kept connections"
    gc.collect()
    in_use = None
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
        info = _LIBC.mallinfo2()
        in_use = (info.uordblks + info.hblkhd) / 2**20  # arenas' allocated chunks + mmap'ed ones
    return Memory(rss_mib(), in_use, len(gc.get_objects()))


def check_nothing_retained(after: Memory, base: Memory, rss_bound_mib: float) -> None:
    """The issue's measure: resident memory back within a bound of where it stood before the soaks."""
    assert after.rss_mib - base.rss_mib <= rss_bound_mib, \
        f"resident memory left (bound {rss_bound_mib} MiB): {after.over(base)}"


def check_no_growth(after: Memory, before: Memory, requests: int, rss_bound_mib: float | None = None) -> None:
    """What a soak of `requests` added to the soak before it: where a leak shows, apart from first uses."""
    assert after.objects - before.objects <= GROWTH_OBJECTS_PER_REQUEST * requests, \
        f"objects grow with requests: {after.over(before)}"
    if after.in_use_mib is not None:
        assert after.in_use_mib - before.in_use_mib <= GROWTH_IN_USE_MIB, \
            f"allocated memory grows with requests: {after.over(before)}"
    if rss_bound_mib is not None:
        assert after.rss_mib - before.rss_mib <= rss_bound_mib, f"resident memory grows: {after.over(before)}"


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, max_batch_size=ROWS, max_queue=CLIENTS, max_tokens_limit=32)
    engine = service.engine
    forward = engine.model.forward

    def slower_prefill(input_ids, *args, **kwargs):
        if input_ids.shape[-1] > 1:
            time.sleep(PREFILL_DELAY_S)  # a wider window for a client to leave while its prompt is prefilled
        return forward(input_ids, *args, **kwargs)

    engine.model.forward = slower_prefill  # the instance's forward: what nn.Module.__call__ runs
    submitted, left_at = [], {}
    submit = engine.submit

    def where(request) -> str:
        """Where a request stands as its client leaves (read from the engine thread's state: indicative)."""
        row = next((row for row in list(engine.scheduler.rows) if row is not None and row.request is request), None)
        if row is not None:
            return "prefilling" if row.prefilling else "decoding"
        return "finished" if request.done else "queued"

    def recording_submit(prompt_ids, params):
        submitted.append(submit(prompt_ids, params))
        return submitted[-1]

    cancel = Request.cancel

    def classified_cancel(request):
        left_at.setdefault(id(request), where(request))  # the first call: the moment the client left
        cancel(request)

    engine.submit = recording_submit
    # on the class, not each request: a closure per request would tie it into a cycle the soak then measures
    with pytest.MonkeyPatch.context() as patch, ServerThread(create_app(service)) as server:
        patch.setattr(Request, "cancel", classified_cancel)
        server.service, server.submitted, server.left_at = service, submitted, left_at
        yield server
    service.close()


def plan(rng: random.Random) -> dict:
    """One request's body and how its client behaves: 'read' to the end, or leave 'on_connect' (after a
    random delay of up to 200 ms), 'before_token' (after the role chunk) or 'mid_stream' (after 1-6 tokens)."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, MAX_WORDS)))
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(2, MAX_TOKENS),
            "stream": True, "stop": ["\u0000never"], "temperature": rng.choice([0, 0.8, 1.0]),
            "seed": rng.randint(0, 2**31)}
    leave = rng.choices(["read", "on_connect", "before_token", "mid_stream"], weights=[6, 1, 1, 1])[0]
    return {"body": body, "leave": leave, "delay_s": rng.uniform(0, 0.2), "tokens": rng.randint(1, 6)}


async def one_request(http: httpx.AsyncClient, step: dict) -> str:
    """Runs one planned request; returns what happened: 'done', or where the client left."""
    leave = step["leave"]

    async def stream() -> str:
        async with http.stream("POST", "/v1/chat/completions", json=step["body"]) as response:
            assert response.status_code == 200, await response.aread()
            tokens = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":  # read to the end (also when the reply ended before the client left)
                    return "done"
                chunk = json.loads(data)
                assert "error" not in chunk, chunk
                delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                if leave == "before_token" and "role" in delta:
                    return "before_token"  # leaving the block closes the connection
                if delta.get("content"):
                    tokens += 1
                    if leave == "mid_stream" and tokens >= step["tokens"]:
                        return "mid_stream"
            raise AssertionError(f"the stream ended without [DONE] ({leave})")

    if leave != "on_connect":
        return await stream()
    try:
        return await asyncio.wait_for(stream(), timeout=step["delay_s"])
    except TimeoutError:
        return "on_connect"


async def soak(url: str, rounds: int, seed: int = 14) -> Counter:
    rng = random.Random(seed)
    plans = [[plan(rng) for _ in range(rounds)] for _ in range(CLIENTS)]
    outcomes: Counter = Counter()
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client(steps: list[dict]) -> None:
            for step in steps:
                outcomes[await one_request(http, step)] += 1

        await asyncio.gather(*(client(steps) for steps in plans))
    return outcomes


async def warm_up(url: str) -> None:
    """Every row at once with the longest prompt and reply a client plans: the cache reaches its full shape."""
    body = {"messages": [{"role": "user", "content": " ".join(WORDS[:1] * MAX_WORDS)}], "max_tokens": MAX_TOKENS,
            "stop": ["\u0000never"]}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        replies = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(ROWS)))
    assert all(reply.status_code == 200 for reply in replies)


def settled(service) -> bool:
    engine = service.engine
    return (service.outstanding == 0 and engine.active_count == 0 and engine.pending_count == 0
            and all(row is None for row in engine.scheduler.rows))


def warm_baseline(served) -> Memory:
    """Warms the server up (full cache shape, first-use allocations), then reads memory."""
    asyncio.run(warm_up(served.url))
    asyncio.run(soak(served.url, 1, seed=0))  # and one request per client: first-use allocations are made
    assert wait_until(lambda: settled(served.service), timeout=30)
    served.submitted.clear()
    served.left_at.clear()
    return settled_memory()


def run_soak(served, rounds: int, seed: int = 14) -> Memory:
    """One soak of `rounds` requests per client, every check of what it leaves in the server; returns the
    memory it leaves."""
    service = served.service
    outcomes = asyncio.run(soak(served.url, rounds, seed))
    total = CLIENTS * rounds
    assert sum(outcomes.values()) == total
    left = total - outcomes["done"]
    print(f"soak: {total} requests from {CLIENTS} clients; outcomes {dict(outcomes)}")
    assert 0.2 * total <= left <= 0.45 * total  # about a third of the requests disconnect
    assert all(outcomes[where] > 0 for where in ("on_connect", "before_token", "mid_stream"))

    assert wait_until(lambda: settled(service), timeout=30), (
        service.outstanding, service.engine.active_count, service.engine.pending_count)
    requests = served.submitted
    assert all(request.finish_reason is not None for request in requests)
    reasons = Counter(request.finish_reason for request in requests)
    assert reasons["error"] == 0, reasons
    assert set(reasons) <= {"length", "stop", "cancelled"}, reasons
    # every client that read to the end got a finished reply; only a client that left is cancelled (one
    # gone on connect may have left before its request was submitted; one may leave as its reply ends)
    assert reasons["length"] + reasons["stop"] >= outcomes["done"], (reasons, outcomes)
    assert left / 2 <= reasons["cancelled"] <= left, (reasons, outcomes)
    left_at = Counter(served.left_at.values())
    print(f"soak: where the engine stood as clients left: {dict(left_at)}")
    # before the first token (the deterministic mid-prefill case is tests/test_serve_disconnect.py's) and after
    assert left_at["queued"] + left_at["prefilling"] > 0 and left_at["decoding"] > 0, left_at

    with httpx.Client(base_url=served.url, timeout=60) as http:
        assert http.get("/health").json()["outstanding_requests"] == 0
        reply = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 4})
        assert reply.status_code == 200, reply.text
    assert wait_until(lambda: settled(service), timeout=10)
    served.submitted.clear()  # the test's own record of every request is no part of the server's memory
    served.left_at.clear()
    return settled_memory()


def test_64_streaming_clients_a_third_disconnecting_leave_nothing_behind(served):
    base = warm_baseline(served)
    first = run_soak(served, ROUNDS)
    requests = CLIENTS * ROUNDS
    print(f"soak: after {requests} requests {first.over(base)} (RSS bound {RSS_BOUND_MIB})")
    check_nothing_retained(first, base, RSS_BOUND_MIB)
    second = run_soak(served, ROUNDS, seed=15)
    print(f"soak: after {requests} more {second.over(first)}")
    check_no_growth(second, first, requests)  # not RSS: between soaks of 128 it moves by up to ~10 MiB either way


@pytest.mark.slow
def test_two_long_soaks_leave_nothing_behind_and_memory_does_not_grow_with_requests(served):
    base = warm_baseline(served)
    first = run_soak(served, 20, seed=14)
    print(f"soak: after 1280 requests {first.over(base)} (RSS bound {RSS_PLATEAU_MIB})")
    check_nothing_retained(first, base, RSS_PLATEAU_MIB)
    second = run_soak(served, 20, seed=15)
    print(f"soak: after 1280 more {second.over(first)} (RSS bound {GROWTH_RSS_MIB})")
    check_no_growth(second, first, 1280, GROWTH_RSS_MIB)
