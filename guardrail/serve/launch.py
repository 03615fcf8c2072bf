"""Running the server: ``serve`` until interrupted, or a ``BackgroundServer`` for tests and benchmarks."""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
import threading
import time
from typing import Any

from .app import create_app
from .config import DEFAULT_PARALLEL, LOOPBACK_HOST_HEADERS, ServerConfig, is_loopback

log = logging.getLogger("guardrail.server")


def serve(model: Any = None, head: Any = None, *, host: str = "127.0.0.1", port: int = 8000,
          config: ServerConfig | None = None, log_level: str = "info", n_parallel: int = DEFAULT_PARALLEL,
          **guard_options: Any) -> None:
    """Load the guard and serve it until interrupted (uvicorn). ``n_parallel``: requests answered at once
    (slots of one shared KV cache); ``guard_options``: the Guard's own (``n_ctx``, ``policy``,
    ``schedule``, ``threshold``, ``tau``, ...): the operator's guard."""
    import uvicorn

    from guardrail.runtime.guard import Guard

    config = config or ServerConfig()
    if is_loopback(host) and not config.allowed_hosts:
        config = dataclasses.replace(config, allowed_hosts=LOOPBACK_HOST_HEADERS)
    if not config.api_key and not is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    guard = Guard(model, head, n_parallel=n_parallel, **{k: v for k, v in guard_options.items() if v is not None})
    try:
        app = create_app(guard, config)
        url_host = f"[{host}]" if ":" in host else host
        print(f"guardrail serve: {guard.model_name} (detail {config.detail}) on "
              f"http://{url_host}:{port}/v1{'' if config.api_key else ', no API key'}", file=sys.stderr, flush=True)
        print(f"guardrail serve: {kv_budget(guard.n_ctx, guard.n_parallel, guard.model.info.kv_bytes_per_token)}",
              file=sys.stderr, flush=True)
        if guard.head.caveat:
            print(f"guardrail serve: note: {guard.head.caveat}", file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                    limit_concurrency=max(64, 4 * config.queue_size))
    finally:
        guard.close()


def kv_budget(n_ctx: int, slots: int, bytes_per_token: int) -> str:
    """The KV memory budget, in words: what the startup line says."""
    mib = n_ctx * bytes_per_token / 2**20
    share = f"shared by {slots} slots ({slots} requests at once)" if slots > 1 else "for one request at a time"
    return (f"KV budget {n_ctx} tokens ({mib:.0f} MiB), {share}; a request longer than the budget is a 400, "
            "one that fits only when others finish waits")


class BackgroundServer:
    """A uvicorn server for ``app`` on a free loopback port, in a daemon thread (tests, benchmarks).

    ``with BackgroundServer(app) as server: server.url`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", start_timeout: float = 30.0, **uvicorn_options: Any):
        import uvicorn

        if not is_loopback(host):
            raise ValueError("BackgroundServer binds loopback addresses only")
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2,
                                **uvicorn_options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"guardrail-server-{self.port}", daemon=True)
        self._start_timeout = start_timeout

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
