"""`gpt2chat serve` (OpenAI-compatible API + web page) and `gpt2chat telegram` (the Telegram bot).

Where the API key comes from (`read_api_key`: the flag, a file, the environment) and whether the address
is reachable from other machines (`is_loopback`) are decided here; the limits go into `ServerLimits`.
Heavy imports (torch, FastAPI, uvicorn, python-telegram-bot) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.serve.limits import ServerLimits

LIMITS = ServerLimits()  # the flags' defaults are the limits' own
API_KEY_ENV = "GPT2CHAT_API_KEY"
log = logging.getLogger("gpt2chat.serve")


def _add_model_options(parser: argparse.ArgumentParser, model: bool = True) -> None:
    from gpt2chat.cli.model import add_model_args

    add_model_args(parser, model=model)
    parser.add_argument("--template", default=None,
                        help="chat template name (default: the one saved with the checkpoint)")
    parser.add_argument("--max-batch", type=int, default=LIMITS.max_batch_size,
                        help="sequences decoded together (default %(default)s)")
    parser.add_argument("--max-queue", type=int, default=LIMITS.max_queue,
                        help="requests that may wait for a batch slot before new ones get 429 (default %(default)s)")
    parser.add_argument("--max-tokens-limit", type=int, default=LIMITS.max_tokens_limit,
                        help="most tokens one request may generate (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=LIMITS.request_timeout_s, metavar="SECONDS",
                        help="wall time one request may take, waiting for a row included; then it ends with "
                             "what it has, finish_reason 'length' (default %(default)g)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads of the engine (llama-server's -t; default torch's, one per core). "
                             "On a machine other programs keep busy, fewer threads than cores can be faster "
                             "(benchmarks/README.md)")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API with a web chat page",
        description="Serve a chat model: /v1/chat/completions, /v1/completions, /v1/models, /health and a "
                    "web chat page at /. Listens on 127.0.0.1 unless --host says otherwise.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 is every network)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    key = serve.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' on every route but /health and the page (default: "
                          f"${API_KEY_ENV} if set; --api-key-file or the variable keep it out of the process list)")
    key.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file's first line")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="let web pages from ORIGIN (e.g. https://chat.example.com) call the API; repeat for "
                            "more (default: none, no CORS headers are sent)")
    serve.add_argument("--model-name", default=None,
                       help="the model's name in /v1/models; requests naming another model get 404 (default: the "
                            "hub id, or the checkpoint folder's name: a training run's OUT for OUT/final)")
    serve.add_argument("--max-body-bytes", type=int, default=LIMITS.max_body_bytes,
                       help="largest request body (default %(default)s bytes)")
    serve.add_argument("--max-connections", type=int, default=LIMITS.max_connections,
                       help="HTTP requests served at once; more get 503 (default %(default)s)")
    serve.add_argument("--stall-timeout", type=float, default=LIMITS.stall_timeout_s, metavar="SECONDS",
                       help="drop a streaming client that accepts no data for this long, freeing its row "
                            "(default %(default)g)")
    _add_model_options(serve)
    serve.set_defaults(handler=run_serve)

    telegram = subparsers.add_parser(
        "telegram", help="run the Telegram bot (token from $TELEGRAM_BOT_TOKEN)",
        description="Answer Telegram chats with a local model (--model) or a running gpt2chat server "
                    "(--server). One history per chat; /start, /reset, /system TEXT.")
    source = telegram.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder to load in this process")
    source.add_argument("--server", help="URL of a running gpt2chat server, e.g. http://127.0.0.1:8000")
    telegram.add_argument("--api-key", default=None, help=f"the server's API key (default: ${API_KEY_ENV})")
    telegram.add_argument("--system", default=None, help="default system prompt for new chats")
    telegram.add_argument("--max-tokens", type=int, default=256, help="tokens per reply (default 256)")
    telegram.add_argument("--temperature", type=float, default=0.8)
    telegram.add_argument("--top-p", type=float, default=0.95)
    telegram.add_argument("--bot-api-url", default=None,
                          help="Bot API base URL (default Telegram's; for a local Bot API server)")
    _add_model_options(telegram, model=False)
    telegram.set_defaults(handler=run_telegram_command)


def read_api_key(flag: str | None = None, file: str | os.PathLike | None = None) -> str | None:
    """The key from the flag, else the file (its first line), else $GPT2CHAT_API_KEY; None when none is set."""
    if flag is not None:
        key = flag.strip()
        if not key:
            raise Gpt2ChatError("--api-key is empty: give a key, or leave the option out to serve without one")
        return key
    if file is not None:
        path = Path(file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise Gpt2ChatError(f"--api-key-file {path}: cannot read it ({type(exc).__name__})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise Gpt2ChatError(f"--api-key-file {path}: the file is empty; its first line must be the key")
        return key
    return os.environ.get(API_KEY_ENV, "").strip() or None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def _limits(args: argparse.Namespace):
    from gpt2chat.serve.limits import ServerLimits

    defaults = ServerLimits()
    return ServerLimits(max_batch_size=args.max_batch, max_queue=args.max_queue,
                        max_tokens_limit=args.max_tokens_limit, request_timeout_s=args.request_timeout,
                        max_body_bytes=getattr(args, "max_body_bytes", defaults.max_body_bytes),
                        stall_timeout_s=getattr(args, "stall_timeout", defaults.stall_timeout_s),
                        max_connections=getattr(args, "max_connections", defaults.max_connections))


def _set_threads(args: argparse.Namespace) -> None:
    """`--threads N`: torch's intra-op threads for this process (checked before any weight is read)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise Gpt2ChatError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _cors_origins(origins: list[str]) -> list[str]:
    from urllib.parse import urlsplit

    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc
                              or parts.path or parts.query or parts.fragment):
            raise Gpt2ChatError(f"--cors-origin {origin!r}: give an origin like https://chat.example.com "
                                "(scheme, host and optional port, no path), or * for any")
    return list(origins)


def served_name(model: str, folder: Path) -> str:
    """The name a checkpoint is served under: a hub id as given; else the folder's name, or for a training
    run's `OUT/final` (and `OUT/adapter`) the run's name, OUT: every run's model folder is called final."""
    if not Path(model).expanduser().is_dir():
        return model
    folder = folder.resolve()
    if folder.name in ("final", "adapter") and folder.parent.name:
        return folder.parent.name
    return folder.name or "gpt2chat"


def _build_service(args: argparse.Namespace, model_name: str | None = None):
    from gpt2chat.cli.model import load_inference_model
    from gpt2chat.serve.service import ChatService

    limits = _limits(args)  # check the options before loading anything
    _set_threads(args)
    folder, model, tokenizer, device, dtype = load_inference_model(args)
    name = model_name or served_name(str(args.model), folder)
    return ChatService(model, tokenizer, template=args.template, model_name=name, limits=limits, device=device,
                       dtype=dtype)


def build_server(args: argparse.Namespace):
    """(uvicorn.Server, ChatService) for `gpt2chat serve`'s options; every option is checked before the
    model is loaded. Warns when the address is reachable from other machines and no key is set."""
    import uvicorn

    from gpt2chat.serve.app import create_app

    if not 0 < args.port < 65536:
        raise Gpt2ChatError(f"--port must be between 1 and 65535, got {args.port}")
    api_key = read_api_key(args.api_key, args.api_key_file)
    cors_origins = _cors_origins(args.cors_origin)
    _limits(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not is_loopback(args.host) and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the model "
                    "(set --api-key-file or $%s)", args.host, API_KEY_ENV)
    service = _build_service(args, args.model_name)
    app = create_app(service, api_key=api_key, cors_origins=cors_origins)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return uvicorn.Server(config), service


def run_serve(args: argparse.Namespace) -> int:
    server, service = build_server(args)
    print(f"serving {service.model_name} on http://{args.host}:{args.port}/ (OpenAI API under /v1)")
    try:
        server.run()
    finally:
        service.close()
    return 0


def run_telegram_command(args: argparse.Namespace) -> int:
    from gpt2chat.serve.telegram_bot import (
        LocalBackend,
        RemoteBackend,
        ReplySettings,
        bot_token,
        run_telegram,
    )

    token = bot_token()  # fail before loading a model when the token is missing
    if args.max_tokens < 1:
        raise Gpt2ChatError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    settings = ReplySettings(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = None
    if args.server:
        backend = RemoteBackend(args.server, read_api_key(args.api_key), settings)
    else:
        service = _build_service(args)
        backend = LocalBackend(service, settings)
    try:
        run_telegram(backend, token=token, base_url=args.bot_api_url, default_system=args.system)
    finally:
        if service is not None:
            service.close()
    return 0
