"""API fuzzing (issue #14): schemathesis against the server's own /openapi.json, over real HTTP, with the
real batched engine on the tiny model.

Every operation of the schema gets a bounded number of generated requests, both ones that fit the schema
(positive) and ones that break it (negative), derandomized so that a run is repeatable. Each answer must
pass schemathesis' checks (no 5xx; the status codes, content types, headers and bodies the schema declares;
every schema-invalid request refused) and ours: every refusal in OpenAI's error shape. One check is left
out, that every schema-valid request is accepted: as OpenAI's own API, this one refuses valid-looking
requests for reasons JSON Schema cannot say (top_logprobs without logprobs, a prompt longer than the
context, max_tokens above the server's limit). Afterwards the server must be healthy: no request
outstanding, every cache row free, and a normal request still answered.
`GPT2CHAT_FUZZ_EXAMPLES` sets the examples per operation and mode (the slow variant runs 200).
"""

from __future__ import annotations

import os

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from gpt2chat.serve.app import create_app  # noqa: E402
from serve_support import ServerThread, openai_error_shape, tiny_service, wait_until  # noqa: E402

EXAMPLES = int(os.environ.get("GPT2CHAT_FUZZ_EXAMPLES", "15"))


def openai_error_body(ctx, response, case) -> bool | None:
    """Our check: a refusal's body is OpenAI's `{"error": {message, type, param, code}}`."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"a {response.status_code} answer is not JSON: {response.text[:200]!r}") from None
    problem = openai_error_shape(body)
    if problem is not None:
        raise AssertionError(f"{response.status_code}: {problem}")
    return True


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    # small limits keep each generated request cheap: generation is bounded by max_tokens_limit
    service = tiny_service(tiny_checkpoint, max_batch_size=4, max_queue=16, max_tokens_limit=8,
                           max_body_bytes=64 * 1024, request_timeout_s=30)
    with ServerThread(create_app(service)) as server:
        server.service = service
        yield server
    service.close()


def fuzz(served, examples: int) -> dict[str, int]:
    """Runs every operation x both modes; returns requests sent per operation."""
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    sent: dict[str, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=served.url, timeout=60)
                sent_for = f"{case.method.upper()} {case.path}"
                sent[sent_for] = sent.get(sent_for, 0) + 1
                case.validate_response(response, additional_checks=[openai_error_body],
                                       excluded_checks=[positive_data_acceptance])

            try:
                run()
            except Unsatisfiable:
                # an operation without parameters or body (GET /health) has no invalid form to generate
                assert mode is GenerationMode.NEGATIVE, label
    return sent


def assert_healthy(served) -> None:
    service = served.service
    assert wait_until(lambda: service.outstanding == 0 and service.engine.active_count == 0
                      and service.engine.pending_count == 0, timeout=30)
    with httpx.Client(base_url=served.url, timeout=60) as http:
        assert http.get("/health").json()["outstanding_requests"] == 0
        reply = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"


def test_every_operation_survives_generated_requests(served):
    sent = fuzz(served, EXAMPLES)
    print("requests fuzzed per operation:", sent, "total:", sum(sent.values()))
    assert all(count >= 1 for count in sent.values())
    assert_healthy(served)


def test_a_vanishing_temperature_is_greedy_and_breaks_no_other_request(served):
    """The fuzz's first finding: temperature 1.8e-88 (inside OpenAI's 0..2) overflowed logits / temperature
    to inf, and the NaN draw failed every request sharing the engine step (a 500 for each)."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(temperature: float) -> httpx.Response:
        return httpx.post(f"{served.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
            "temperature": temperature})

    with ThreadPoolExecutor(4) as pool:  # sent together, so they share engine steps
        replies = list(pool.map(ask, [1.7787324941885278e-88, 0.0, 1e-30, 0.0]))
    assert [reply.status_code for reply in replies] == [200] * 4, [reply.text[:200] for reply in replies]
    texts = {reply.json()["choices"][0]["message"]["content"] for reply in replies}
    assert len(texts) == 1  # every one of them is the greedy reply
    assert_healthy(served)


@pytest.mark.slow
def test_every_operation_survives_many_generated_requests(served):
    sent = fuzz(served, 200)
    print("requests fuzzed per operation:", sent, "total:", sum(sent.values()))
    assert_healthy(served)
