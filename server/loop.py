"""The server's I/O event loop, on a thread of its own.

``grpc.aio`` needs a running asyncio loop; the rest of the server (the command line, the
tests, the repository's polling thread) is synchronous. ``LoopThread`` runs one loop for
the server's lifetime and lets synchronous code run coroutines on it and wait for them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any


class LoopThread:
    """An asyncio event loop running on a daemon thread until ``close``."""

    def __init__(self, name: str = "grpc-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coroutine`` on the loop and wait for its result (never call this from the
        loop's own thread: it would wait for itself)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called on the loop's own thread")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run ``coroutine`` on the loop without waiting (from any thread, the loop's own
        included)."""
        asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        """Stop the loop (cancelling what still runs on it) and join its thread."""
        if self.loop.is_closed():
            return
        self.run(_cancel_others())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_others() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
