"""Run an NBDServer on its own event loop in a background thread (tests, tools)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from virtua.nbd.exports import ExportProvider
from virtua.nbd.server import NBDServer


class ServerThread:
    def __init__(
        self,
        provider: ExportProvider,
        *,
        host: str | None = "127.0.0.1",
        port: int | None = 0,
        unix_path: str | None = None,
        use_uvloop: bool = True,
        **server_kwargs: Any,
    ) -> None:
        self.provider = provider
        self.host, self.req_port, self.unix_path = host, port, unix_path
        self.use_uvloop = use_uvloop
        self.kwargs = server_kwargs
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: NBDServer | None = None
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="nbd-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        if self.use_uvloop:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            try:
                self.server = NBDServer(self.provider, **self.kwargs)
                await self.server.start(self.host, self.req_port, self.unix_path)
                self.port = self.server.port
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self.server.serve_forever()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def call(self, fn: Any, timeout: float = 10) -> Any:
        """Run fn() on the server loop and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self, timeout: float = 15) -> None:
        if self.loop is not None and self.server is not None and self._thread is not None:
            if self._thread.is_alive():
                fut = asyncio.run_coroutine_threadsafe(self.server.close(), self.loop)
                fut.result(timeout)
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
