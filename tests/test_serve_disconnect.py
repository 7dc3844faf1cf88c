"""A client that goes away frees its engine row, with the real engine on the tiny model: while its prompt
is being prefilled (the model's prefill is held at a gate the test opens) and while its reply streams,
for streamed and whole answers. Also `/metrics` after real traffic."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpt2chat.serve.app import create_app
from serve_support import PrefillGate, ServerThread, tiny_service, wait_until

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, max_batch_size=2, max_queue=2, max_tokens_limit=200)
    gate = PrefillGate(service.engine.model)
    submitted = []
    submit = service.engine.submit

    def recording_submit(prompt_ids, params):
        submitted.append(submit(prompt_ids, params))
        return submitted[-1]

    service.engine.submit = recording_submit
    with ServerThread(create_app(service)) as server:
        server.service, server.gate, server.submitted = service, gate, submitted
        yield server
    gate.open()
    service.close()


def all_rows_free(server) -> bool:
    engine = server.service.engine
    return engine.active_count == 0 and engine.pending_count == 0 and server.service.outstanding == 0


# a stop string the model never writes, so that only the client can end the reply early
LONG_REPLY = {"messages": MESSAGES, "max_tokens": 200, "stop": ["\u0000never"]}


def test_streaming_client_gone_during_prefill_frees_the_row(served):
    served.gate.close()
    with httpx.Client(base_url=served.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json={**LONG_REPLY, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the answer has started
            assert served.gate.entered.wait(10)  # the engine is inside this prompt's prefill
    request = served.submitted[-1]
    assert wait_until(lambda: request.cancelled, timeout=10)  # noticed while the prefill is still held
    served.gate.open()
    assert wait_until(lambda: all_rows_free(served), timeout=10)
    assert request.finish_reason == "cancelled" and request.completion_tokens <= 1


def test_waiting_client_gone_during_prefill_frees_the_row(served):
    served.gate.close()
    # a prompt the previous test did not send: the prompt cache would leave one token to prefill, which
    # the gate takes for a decode step
    other = {**LONG_REPLY, "messages": [{"role": "user", "content": "Tell me another long story."}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/chat/completions", json=other, timeout=1.0)
    assert served.gate.entered.is_set()
    request = served.submitted[-1]
    assert wait_until(lambda: request.cancelled, timeout=10)
    served.gate.open()
    assert wait_until(lambda: all_rows_free(served), timeout=10)
    assert request.finish_reason == "cancelled" and request.completion_tokens <= 1


def test_streaming_client_gone_mid_reply_frees_the_row(served):
    with httpx.Client(base_url=served.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={
                "prompt": "Once upon a time", "max_tokens": 200, "stream": True}) as response:
            lines = response.iter_lines()
            texts = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
            assert len(texts) >= 2  # tokens are flowing
    request = served.submitted[-1]
    assert wait_until(lambda: all_rows_free(served), timeout=10)
    assert request.finish_reason == "cancelled" and request.completion_tokens < 200


def test_the_row_serves_again_after_a_disconnect(served):
    body = httpx.post(f"{served.url}/v1/chat/completions", timeout=60,
                      json={"messages": MESSAGES, "max_tokens": 3, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] >= 1 and all_rows_free(served)


# ---- /metrics ---------------------------------------------------------------------------------------------


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_requests_tokens_and_latencies(served):
    before = scrape(served)
    usages = []
    for body in ({"messages": MESSAGES, "max_tokens": 5, "temperature": 0},
                 {"messages": MESSAGES, "max_tokens": 4, "n": 2, "temperature": 1, "seed": 3}):
        usages.append(httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60).json()["usage"])
    assert httpx.post(f"{served.url}/v1/chat/completions", json={"messages": []}).status_code == 400
    time.sleep(0.1)
    after = scrape(served)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("gpt2chat_http_requests_total", route="/v1/chat/completions", status="200") == 2
    assert delta("gpt2chat_http_requests_total", route="/v1/chat/completions", status="400") == 1
    assert delta("gpt2chat_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("gpt2chat_completion_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("gpt2chat_time_to_first_token_seconds_count") == 3  # one per generation
    assert delta("gpt2chat_time_to_first_token_seconds_sum") > 0
    assert delta("gpt2chat_time_per_output_token_seconds_count") >= 1
    assert after[("gpt2chat_requests_running", ())] == 0 and after[("gpt2chat_requests_waiting", ())] == 0
    assert after[("gpt2chat_cache_rows", ())] == 2 and after[("gpt2chat_cache_rows_in_use", ())] == 0


def test_metrics_see_a_running_request(served):
    served.gate.close()
    thread = threading.Thread(target=lambda: httpx.post(f"{served.url}/v1/chat/completions", timeout=60,
                                                        json={"messages": [{"role": "user", "content": "Count the metrics."}],
                                                              "max_tokens": 2}))  # a new prompt: see above
    thread.start()
    try:
        assert served.gate.entered.wait(10)
        sample = scrape(served)
        assert sample[("gpt2chat_requests_running", ())] + sample[("gpt2chat_requests_waiting", ())] == 1
    finally:
        served.gate.open()
        thread.join(timeout=30)
