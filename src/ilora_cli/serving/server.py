"""``ilora serve``: listen, load the run in the background, answer until SIGTERM, then drain and exit 0.

The socket is bound here, before uvicorn starts, so that a port in use or an unknown host is one sentence and
exit code 2, and so that ``port=0`` can report the port it got. uvicorn then serves on that socket, over its h11
protocol with a clock on each request (protocol.py), at most ``max_connections`` connections answered. On
SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets the requests in flight finish (at most
``request_timeout_s`` more), and the app stops its batcher.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from ..console import err, labelled
from ..errors import UserError
from .config import API_KEY_ENV, ServeConfig

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def require_extra() -> None:
    """The server's libraries are an optional extra; without them, one sentence."""
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            raise UserError(
                f"ilora serve needs the serve extra ({module} is not installed): pip install 'ilora[serve]'."
            ) from None


def api_key(config: ServeConfig) -> str | None:
    """The key from the settings, else from $ILORA_API_KEY (an empty variable counts as unset; one of only
    whitespace is refused: no client could send it, since HTTP drops the spaces around a header's value)."""
    if config.api_key:
        return config.api_key
    key = os.environ.get(API_KEY_ENV)
    if key and not key.strip():
        raise UserError(f"${API_KEY_ENV} holds only whitespace; give a key, or unset it to serve without one.")
    return key or None


def serve(config: ServeConfig, on_listening: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Serve ``config.run`` until SIGTERM or SIGINT; returns the exit code (0 after a graceful stop).

    ``on_listening(address)`` is called once the socket accepts connections (the model may still be loading:
    ``GET /readyz`` says when it is not).
    """
    require_extra()
    import uvicorn

    from ..evaluation.evaluate import resolve_run
    from .app import create_app
    from .protocol import RequestDeadline
    from .service import Service

    run_dir = resolve_run(config.run)
    key = api_key(config)
    sock = listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    exit_code = 0

    def fatal(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        server.should_exit = True

    app = create_app(Service(config, run_dir), api_key=key, on_fatal=fatal)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="info" if config.access_log else "warning",
            log_config=_log_config(),
            access_log=config.access_log,
            lifespan="on",
            timeout_graceful_shutdown=int(config.request_timeout_s) + 5,
            http=RequestDeadline.with_timeout(config.read_timeout_s),
            ws="none",  # no upgrade to another protocol, which would leave the clock behind
            # uvicorn answers 503 once this many connections are open, the request's own included
            limit_concurrency=config.max_connections + 1,
            # a head is refused with 431 by the app once whole (app.HeaderLimit); h11 only has to bound one that
            # is still arriving, with room above the limit so that one just above it gets the app's sentence
            h11_max_incomplete_event_size=2 * config.max_header_bytes,
        )
    )
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    address = {"url": url, "host": host, "port": port, "run": str(run_dir), "docs": f"{url}/docs", "pid": os.getpid()}
    if key is None and config.host not in LOOPBACK:
        labelled(
            "warning",
            f"listening on {config.host} without an API key: anyone who can reach it can use "
            f"it; set {API_KEY_ENV} (or --api-key).",
        )
    # uvicorn re-raises the signal that stopped it once it has drained; this handler turns SIGTERM into exit 0.
    signal.signal(signal.SIGTERM, _exit_quietly)
    asyncio.run(_serve(server, sock, lambda: _listening(address, on_listening)))
    return exit_code


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with its access log on stderr like every other log line (stdout is for --json)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def print_address(address: dict[str, Any]) -> None:
    """The address as one JSON line on stdout (``--json``), so that a script can read it as soon as it is there."""
    sys.stdout.write(json.dumps(address) + "\n")
    sys.stdout.flush()


def _exit_quietly(signum, frame) -> None:
    raise SystemExit(0)


def _listening(address: dict[str, Any], on_listening) -> None:
    err.print(f"Listening on {address['url']} (API docs: {address['docs']}); loading the run ...", highlight=False)
    if on_listening is not None:
        on_listening(address)


async def _serve(server, sock: socket.socket, on_listening: Callable[[], None]) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        on_listening()
    await task


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); trouble is one sentence."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"Cannot listen on {host!r}: {exc.strerror}.") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        raise UserError(f"Cannot listen on {host}:{port}: {reason}.") from None
    return sock
