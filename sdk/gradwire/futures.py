"""APIFuture: the result of a request whose place in the run's order is fixed."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from gradwire.errors import APITimeoutError

T = TypeVar("T")


class APIFuture(Generic[T]):
    """A pending result. `result(timeout=None)` blocks; `await future` and
    `await future.result_async()` wait without blocking the event loop.

    `fetch(timeout)` produces the value (long-polling the server); it runs at
    most once to completion, and its outcome is kept.
    """

    def __init__(self, fetch: Callable[[float | None], T],
                 submitted: concurrent.futures.Future | None = None):
        self._fetch = fetch
        self._submitted = submitted  # resolves once the server has accepted the request
        self._lock = threading.Lock()
        self._outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

    @classmethod
    def completed(cls, value: T) -> APIFuture[T]:
        future: APIFuture[T] = cls(lambda timeout: value)
        future._outcome.set_result(value)
        return future

    def result(self, timeout: float | None = None) -> T:
        """The value, waiting up to `timeout` seconds (None: forever).

        Raises the request's error, or APITimeoutError if the wait ran out (the
        request goes on; call result() again to keep waiting)."""
        started = time.monotonic()
        # Another thread may be fetching: this one waits for it within its own timeout.
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise APITimeoutError(f"no result within {timeout} s (another thread is waiting for it); "
                                  "the request goes on")
        try:
            if not self._outcome.done():
                left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
                try:
                    self._outcome.set_result(self._fetch(left))
                except APITimeoutError:
                    raise
                except Exception as error:
                    self._outcome.set_exception(error)
        finally:
            self._lock.release()
        return self._outcome.result()

    async def result_async(self, timeout: float | None = None) -> T:
        """The value, awaited in a worker thread."""
        return await asyncio.to_thread(self.result, timeout)

    def done(self) -> bool:
        """Whether the request has finished (successfully or not). Asks the server without
        waiting, and keeps the value or error it finds, so a loop polling done() ends."""
        if not self._outcome.done():
            try:
                self.result(timeout=0)
            except APITimeoutError:
                return False
            except Exception:  # noqa: BLE001 - the request's own error, kept for result()
                pass
        return True

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()
