"""The server's limits and security (issue #14), over real uvicorn servers on loopback.

Limits: a request that runs past --request-timeout ends with what it has and frees its row; a streaming
client that stops reading is dropped after --stall-timeout (its place among the requests the server holds
is freed, so the next request is served); more than --max-connections requests at once get a 503 in
OpenAI's shape while /health still answers. Security: the API key from the flag, a file or the
environment, compared as digests, never in any log line; every route but /health and the page needs it;
no CORS header unless --cors-origin; a warning when listening beyond loopback without a key.
Replies that must outlast what a test watches run on the real scheduler with each step slowed (`serve_support.pace`).
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time

import httpx
import pytest

from gpt2chat.cli import main
from gpt2chat.serve.app import create_app
from serve_support import (
    ServerThread,
    assert_openai_error,
    tiny_service,
    wait_until,
)

USER = [{"role": "user", "content": "Hello there"}]


def all_free(service) -> bool:
    return service.engine.active_count == 0 and service.outstanding == 0


# ---- per-request timeout ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_timeout_ends_with_what_it_has_and_frees_its_row(stream, tiny_checkpoint):
    # the real scheduler, each step held 50 ms: 64 tokens would take 3.2 s
    service = tiny_service(tiny_checkpoint, step_s=0.05, max_batch_size=1, max_queue=0, request_timeout_s=0.6)
    body = {"messages": USER, "max_tokens": 64, "stream": stream, "stream_options": {"include_usage": True},
            "temperature": 0, "stop": ["\u0000never"]}
    if not stream:
        body.pop("stream_options")
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        started = time.monotonic()
        response = http.post("/v1/chat/completions", json=body)
        took = time.monotonic() - started
        assert response.status_code == 200, response.text
        if stream:
            events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
            assert events[-1] == "[DONE]"
            import json

            chunks = [json.loads(e) for e in events[:-1]]
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            usage = chunks[-1]["usage"]
        else:
            finish = [response.json()["choices"][0]["finish_reason"]]
            usage = response.json()["usage"]
        assert finish[-1] == "length"
        assert 0 < usage["completion_tokens"] < 64  # cut by the clock, not by max_tokens
        assert took < 2.5
        assert wait_until(lambda: all_free(service), timeout=2)
        # the one row serves again at once
        assert http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200
    service.close()


def test_a_request_waiting_for_a_row_counts_its_wait_against_the_timeout(tiny_checkpoint):
    from serve_support import PrefillGate

    service = tiny_service(tiny_checkpoint, max_batch_size=1, max_queue=1, request_timeout_s=1.0)
    gate = PrefillGate(service.engine.model)
    gate.close()  # the first prompt's prefill is held: the only row stays taken
    with ServerThread(create_app(service)) as srv:
        results: dict[str, httpx.Response] = {}

        def ask(name: str) -> None:
            results[name] = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                                       json={"messages": USER, "max_tokens": 8})

        first = threading.Thread(target=ask, args=("first",))
        first.start()
        assert gate.entered.wait(10)
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        second.join(10)  # waits for the row, then its second runs out
        assert not second.is_alive()
        assert results["second"].json()["choices"][0]["finish_reason"] == "length"
        assert results["second"].json()["usage"]["completion_tokens"] == 0
        gate.open()
        first.join(10)
        assert results["first"].status_code == 200
        assert wait_until(lambda: all_free(service) and service.engine.pending_count == 0, timeout=5)
    service.close()


# ---- a client that stops reading ----------------------------------------------------------------------


def _send_and_never_read(port: int, body: bytes) -> socket.socket:
    """A client with a 4 KiB receive buffer that sends one request and then reads nothing."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return client


def test_with_the_real_engine_a_client_that_stops_reading_holds_its_place_only_until_the_stall_timeout(
        tiny_checkpoint):
    import json

    # one place in all (one row, no queue): while the stuck client holds it, the next request gets a 429
    service = tiny_service(tiny_checkpoint, max_batch_size=1, max_queue=0, max_tokens_limit=250, stall_timeout_s=1.0)
    srv = ServerThread(create_app(service))
    srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with srv:
        # ~240 events of ~1 KiB (top logprobs), greedy: far more than the socket buffers and uvicorn's hold
        body = json.dumps({"messages": USER, "max_tokens": 240, "stream": True, "logprobs": True,
                           "top_logprobs": 5, "temperature": 0, "stop": ["\u0000never"]}).encode()
        stuck = _send_and_never_read(srv.port, body)
        try:
            assert wait_until(lambda: service.outstanding == 1, timeout=10)
            started = time.monotonic()
            busy = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=10)
            assert_openai_error(busy, 429)
            assert wait_until(lambda: all_free(service), timeout=15), (service.engine.active_count, service.outstanding)
            assert time.monotonic() - started >= 0.5  # held until the stall timeout, not dropped at once
            reply = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=10)
            assert reply.status_code == 200, reply.text
        finally:
            stuck.close()
    service.close()


def test_a_slow_reader_that_keeps_reading_is_not_dropped(tiny_checkpoint):
    import json

    service = tiny_service(tiny_checkpoint, step_s=0.02, stall_timeout_s=0.3)
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions",
                         json={"messages": USER, "max_tokens": 30, "stream": True, "temperature": 0,
                               "stop": ["\u0000never"], "stream_options": {"include_usage": True}}) as response:
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    time.sleep(0.05)  # slower than the tokens come (1.5 s in all), but it never stops reading
        assert events[-1] == "[DONE]"  # the whole answer arrived: it was not dropped at 0.3 s
        usage = json.loads(events[-2])["usage"]
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2]]
        assert finish[-1] in ("stop", "length") and usage["completion_tokens"] > 10
    service.close()


# ---- connections --------------------------------------------------------------------------------------


def test_requests_beyond_max_connections_get_503_and_health_still_answers(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, step_s=0.05, max_connections=2)
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        streams = [http.stream("POST", "/v1/chat/completions",
                               json={"messages": USER, "max_tokens": 64, "stream": True}) for _ in range(2)]
        held = [stream.__enter__() for stream in streams]
        lines = [response.iter_lines() for response in held]
        for it in lines:
            next(it)  # both replies have started
        error = assert_openai_error(httpx.get(f"{srv.url}/v1/models", timeout=10), 503)
        assert error["code"] == "too_many_connections"
        assert httpx.get(f"{srv.url}/v1/models", timeout=10).headers["retry-after"] == "1"
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        for stream in streams:
            stream.__exit__(None, None, None)
        assert wait_until(lambda: all_free(service), timeout=5)
        assert http.get("/v1/models").status_code == 200
    service.close()


# ---- API key ------------------------------------------------------------------------------------------


def test_the_api_key_comes_from_the_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    from gpt2chat.cli.serve import read_api_key

    key_file = tmp_path / "key"
    key_file.write_text("from-file\nanything after the first line is ignored\n")
    monkeypatch.setenv("GPT2CHAT_API_KEY", "from-env")
    assert read_api_key("from-flag", None) == "from-flag"
    assert read_api_key(None, key_file) == "from-file"
    assert read_api_key(None, None) == "from-env"
    monkeypatch.delenv("GPT2CHAT_API_KEY")
    assert read_api_key(None, None) is None
    (tmp_path / "empty").write_text("\n")
    for path, message in [(tmp_path / "empty", "the file is empty"), (tmp_path / "absent", "cannot read it")]:
        with pytest.raises(Exception, match=message):
            read_api_key(None, path)


@pytest.mark.parametrize("argv, message", [
    (["--api-key-file", "/nonexistent/key"], "--api-key-file /nonexistent/key: cannot read it"),
    (["--api-key", " "], "--api-key is empty"),
    (["--cors-origin", "chat.example.com/page"], "--cors-origin 'chat.example.com/page'"),
    (["--request-timeout", "0"], "--request-timeout must be a number of seconds"),
    (["--stall-timeout", "nan"], "--stall-timeout must be a number of seconds"),
    (["--max-connections", "0"], "--max-connections must be a whole number"),
])
def test_bad_security_and_limit_options_are_one_line_errors_before_loading(argv, message, tmp_path, capsys):
    # the model folder does not exist: an option error must come first
    assert main(["serve", "--model", str(tmp_path / "no-model"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_keys_are_compared_as_equal_length_digests(monkeypatch, tiny_checkpoint):
    from gpt2chat.serve import auth

    compared: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def recording(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    service = tiny_service(tiny_checkpoint)
    with ServerThread(create_app(service, api_key="k" * 40)) as srv:
        for given in ["", "Bearer x", "Bearer " + "k" * 39, "Bearer " + "k" * 400, "Bearer " + "k" * 40]:
            httpx.get(f"{srv.url}/v1/models", headers={"Authorization": given} if given else {}, timeout=10)
    assert compared == [(32, 32)] * 5  # SHA-256 of both sides: the key's length and content never show
    service.close()


def test_every_route_but_health_and_the_page_needs_the_key(tiny_checkpoint):
    from starlette.routing import Mount

    service = tiny_service(tiny_checkpoint)
    app = create_app(service, api_key="sekrit")
    public = {"/health", "/"}
    checked = 0
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as http:
        for route in app.routes:
            if isinstance(route, Mount):
                assert http.get(f"{route.path}/index.html").status_code == 200  # the page's files
                continue
            path = route.path.replace("{model_id:path}", "tiny").replace("{model_id}", "tiny")
            for method in sorted(route.methods - {"HEAD"}):
                body = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": USER}
                kwargs = {"json": {**body, "max_tokens": 1}} if method == "POST" else {}
                open_status = http.request(method, path, **kwargs).status_code
                keyed = http.request(method, path, headers={"Authorization": "Bearer sekrit"}, **kwargs)
                assert keyed.status_code == 200, (method, path, keyed.text)
                if path in public:
                    assert open_status == 200, path
                else:
                    assert open_status == 401, (method, path)
                    checked += 1
    assert checked >= 6  # models, model, chat, completions, metrics, openapi.json, docs ...
    service.close()


def test_the_api_key_never_appears_in_the_logs(tiny_checkpoint, tmp_path, capfd):
    from gpt2chat.cli import build_parser
    from gpt2chat.cli.serve import build_server

    key = "sk-reliability-7f3a9c1e5b"
    (tmp_path / "key").write_text(key + "\n")
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "gpt2chat")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        args = build_parser().parse_args(["serve", "--model", str(tiny_checkpoint), "--device", "cpu", "--port",
                                          str(port), "--api-key-file", str(tmp_path / "key"), "--max-batch", "2"])
        server, service = build_server(args)
        server.config.log_level = logging.DEBUG
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        assert wait_until(lambda: server.started, timeout=30)
        url = f"http://127.0.0.1:{port}"
        for header in [f"Bearer {key}x", f"Bearer {key[:-1]}", key, f"Basic {key}"]:
            assert httpx.get(f"{url}/v1/models", headers={"Authorization": header}, timeout=10).status_code == 401
        good = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/v1/models", headers=good, timeout=10).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", headers=good, timeout=30,
                          json={"messages": USER, "max_tokens": 2}).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", headers=good, timeout=30,
                          json={"messages": "not a list"}).status_code == 400
        server.should_exit = True
        thread.join(15)
        service.close()
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    out, err = capfd.readouterr()
    logged = captured.getvalue() + out + err
    assert "GET /v1/models" in logged and "401" in logged  # the access log did see the refusals
    assert key not in logged and key[:-1] not in logged


# ---- CORS and the address -----------------------------------------------------------------------------


PREFLIGHT = {"Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def test_no_cors_headers_unless_an_origin_is_named(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint)
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=10) as http:
        for response in (http.options("/v1/chat/completions", headers=PREFLIGHT),
                         http.get("/v1/models", headers={"Origin": "https://chat.example.com"})):
            assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    with ServerThread(create_app(service, api_key="sekrit", cors_origins=["https://chat.example.com"])) as srv, \
            httpx.Client(base_url=srv.url, timeout=10) as http:
        preflight = http.options("/v1/chat/completions", headers=PREFLIGHT)  # a browser sends no key here
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://chat.example.com"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = http.get("/v1/models", headers={"Origin": "https://chat.example.com"})
        assert refused.status_code == 401  # the page can read why
        assert refused.headers["access-control-allow-origin"] == "https://chat.example.com"
        other = http.get("/v1/models", headers={"Origin": "https://evil.example.net",
                                                "Authorization": "Bearer sekrit"})
        assert "access-control-allow-origin" not in other.headers
        wrong = http.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example.net"})
        assert "access-control-allow-origin" not in wrong.headers
    service.close()


def test_the_server_listens_on_loopback_unless_told_and_warns_without_a_key(tiny_checkpoint, caplog):
    from gpt2chat.cli import build_parser
    from gpt2chat.cli.serve import build_server, is_loopback

    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com")] == [False] * 4
    parser = build_parser()
    common = ["serve", "--model", str(tiny_checkpoint), "--device", "cpu", "--max-batch", "1"]
    assert parser.parse_args(common).host == "127.0.0.1"
    for extra, warned in [([], False), (["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--api-key", "k"], False)]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gpt2chat.serve"):
            server, service = build_server(parser.parse_args(common + extra))
        service.close()
        assert server.config.host == (extra[1] if extra else "127.0.0.1")
        warnings = [r.getMessage() for r in caplog.records if "without an API key" in r.getMessage()]
        assert bool(warnings) == warned, (extra, warnings)
