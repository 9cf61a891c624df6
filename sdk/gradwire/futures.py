"""APIFuture: the result of a request whose place in the run's order is fixed."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from gradwire.errors import APIConnectionError, APITimeoutError

T = TypeVar("T")


class APIFuture(concurrent.futures.Future, Generic[T]):
    """A pending result, fetched in the background as soon as the server has it (a thread
    long-polls it once the request is sent). A concurrent.futures.Future: done(),
    add_done_callback(), concurrent.futures.wait / as_completed and asyncio.wrap_future
    take it; `await future` and `await future.result_async()` wait without blocking the
    event loop. A sent request cannot be taken back: cancel() is False.

    `fetch()` produces the value (long-polling the server); it is called once.
    """

    def __init__(self, fetch: Callable[[], T],
                 submitted: concurrent.futures.Future | None = None):
        super().__init__()
        self.set_running_or_notify_cancel()
        self._fetch = fetch
        self._submitted = submitted  # resolves once the server has accepted the request
        if submitted is None:
            self._start_fetching()
        else:
            # Weakly: a strong reference from `submitted` back to this future would make a
            # cycle, and keep its value (a SamplingClient holding a snapshot) until a collection.
            def start(_, this=weakref.ref(self)) -> None:
                future = this()
                if future is not None:  # else nobody can ask for the result
                    future._start_fetching()

            submitted.add_done_callback(start)

    def result(self, timeout: float | None = None) -> T:
        """The value, waiting up to `timeout` seconds (None: forever).

        Raises the request's error, or APITimeoutError (a TimeoutError) if the wait ran out
        (the request goes on; call result() again to keep waiting)."""
        if not concurrent.futures.wait([self], timeout).done:
            raise APITimeoutError(f"no result within {timeout} s; the request goes on: call result() again "
                                  "to keep waiting")
        return super().result()

    async def result_async(self, timeout: float | None = None) -> T:
        """The value, awaited on the event loop."""
        try:
            # Shielded: a caller that stops waiting leaves the request and its result alone.
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self)), timeout)
        except TimeoutError:
            if self.done():  # the request's own error, or done as the wait ran out
                return self.result()
            raise APITimeoutError(f"no result within {timeout} s; the request goes on: await it again "
                                  "to keep waiting") from None

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def _start_fetching(self) -> None:
        try:
            threading.Thread(target=self._fetch_once, daemon=True, name="gradwire-result").start()
        except RuntimeError as error:  # no thread to be had (a thread limit; the interpreter is exiting)
            self.set_exception(APIConnectionError(f"the result cannot be fetched: {error}"))

    def _fetch_once(self) -> None:
        try:
            value = self._fetch()
        except concurrent.futures.CancelledError:  # its send was dropped by ServiceClient.close()
            self.set_exception(APIConnectionError("the client is closed (close() was called): the request "
                                                  "was not sent"))
        except BaseException as error:  # noqa: BLE001 - the request's outcome, raised by result()
            self.set_exception(error)
        else:
            self.set_result(value)
        finally:
            self._fetch = None  # what it holds (the request's data, a custom loss) can go
