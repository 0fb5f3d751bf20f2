"""/healthz (the process is alive) and /readyz (connected and able to work) on probe_port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_http(
    port: int, routes: Mapping[str, Handler], option: str, shutdown_timeout: float = 60.0
) -> web.AppRunner:
    """Serve GET routes on port (the value of option) until the runner is cleaned up; a
    RuntimeError that says so when the port cannot be had."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, port=port).start()
    except OSError as exc:
        await runner.cleanup()
        raise RuntimeError(
            f"cannot serve HTTP on port {port}: {exc.strerror or exc} "
            f"(is another process using it? check {option})"
        ) from exc
    return runner


class Probes:
    def __init__(self, port: int, ready: Callable[[], bool]) -> None:
        self.port = port
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        routes = {"/healthz": self._healthz, "/readyz": self._readyz}
        self._runner = await serve_http(self.port, routes, "probe_port")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
