"""One server per checkpoint folder: an exclusive lock on a file in it, held while
the server lives. A second server on the folder would mark the first one's runs
unloaded, delete its saves in progress and its spooled outputs (its startup
cleans up what a crashed server left); it is refused instead. The operating
system releases the lock when the process ends, however it ends.
"""
from __future__ import annotations

import fcntl
import os
import pathlib

LOCK_FILE = ".gradwire-server.lock"


class FolderInUse(Exception):
    """Another live server holds the folder."""


class FolderLock:
    """Holds `folder`'s lock until release(); FolderInUse if another server holds it."""

    def __init__(self, folder: pathlib.Path):
        path = folder / LOCK_FILE
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise FolderInUse(f"in use by another gradwire-server (pid {holder})") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the file releases its lock
            self._fd = -1
