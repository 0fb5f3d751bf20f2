"""/healthz (the process is alive) and /readyz (connected and able to work) on probe_port."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web


class Probes:
    def __init__(self, port: int, ready: Callable[[], bool]) -> None:
        self.port = port
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, port=self.port).start()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
