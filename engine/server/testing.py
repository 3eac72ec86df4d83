"""Run a WaferServer on a background thread (its own event loop), for tests, benches and the demo.

    with ServerThread(registry, ServerOptions(port=0, metrics_port=0)) as srv:
        client = WaferClient(srv.address)
        ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading

from engine.server.app import ServerOptions, WaferServer
from engine.server.registry import ModelEntry, Registry


def single_model_registry(path: str, name: str = "tiny", **entry_kw) -> Registry:
    return Registry([ModelEntry(name=name, path=str(path), **entry_kw)], default=name)


class ServerThread:
    def __init__(self, registry: Registry, options: ServerOptions | None = None):
        self.registry = registry
        self.options = options or ServerOptions(port=0, metrics_port=0)
        self.server: WaferServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 300.0, wait_ready: bool = True) -> "ServerThread":
        self.thread = threading.Thread(target=self._run, name="wafer-test-server", daemon=True)
        self.thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error
        if wait_ready:
            self.call(self.server.wait_ready(timeout), timeout + 5)
        return self

    def _run(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self.server = WaferServer(self.registry, self.options)
            try:
                await self.server.start()
            except BaseException as e:
                self._error = e
                self._started.set()
                return
            self._started.set()
            await self.server.wait_stopped()

        asyncio.run(main())

    def call(self, coro, timeout: float | None = 60.0):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def metrics_url(self) -> str:
        return f"http://{self.server.options.host}:{self.server.metrics_port}/metrics"

    def runtime(self, name: str | None = None):
        entry = self.registry.lookup(name or "")
        return self.server.runtime_for(entry)

    def drain(self, grace_s: float = 0.0, timeout: float = 60.0) -> None:
        self.call(self.server.drain(grace_s), timeout)

    def stop(self) -> None:
        if (self.server is not None and self.loop is not None and not self.loop.is_closed()
                and not self.server._stopped.is_set()):
            try:
                self.call(self.server.stop(0), 30)
            except (RuntimeError, cf.CancelledError):  # the loop ended meanwhile (drain finished)
                pass
        if self.thread is not None:
            self.thread.join(30)

    def __enter__(self) -> "ServerThread":
        if self.thread is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
