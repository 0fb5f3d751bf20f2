"""/healthz (the process is alive) and /readyz (connected and able to work) on probe_port
(of bind_address: listening.host)."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_http(
    port: int,
    routes: Mapping[str, Handler],
    option: str,
    shutdown_timeout: float = 60.0,
    host: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> web.AppRunner:
    """Serve GET routes on host (None: every interface) and port (the value of option),
    over TLS with ssl_context, until the runner is cleaned up; a RuntimeError that says so
    when the port cannot be had."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host=host, port=port, ssl_context=ssl_context).start()
    except OSError as exc:
        await runner.cleanup()
        raise RuntimeError(
            f"cannot serve HTTP on port {port} of {host or 'every interface'}: "
            f"{exc.strerror or exc} (is another process using it? check {option} and "
            "bind_address)"
        ) from exc
    return runner


class Probes:
    def __init__(self, port: int, ready: Callable[[], bool], host: str | None = None) -> None:
        self.port = port
        self.host = host
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        routes = {"/healthz": self._healthz, "/readyz": self._readyz}
        self._runner = await serve_http(self.port, routes, "probe_port", host=self.host)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
