"""Per-datum outputs of one forward(-backward) operation, kept in a file once they are many.

A streamed batch of any size computes outputs (logprobs [N] or [N, K] per
datum) as it goes; holding them in memory until the client reads them would
make the server's memory grow with the dataset. Past MEMORY_BYTES they are
appended to one file per operation instead (under the checkpoint folder), read
back in chunks by ReadOutputs, and the file is removed with the operation.
Fewer stay in memory (an inline response holds as many anyway): a file per
request would cost the event loop a few system calls, each a GIL hand-over
with the worker thread, for every training step. Used on the event loop only.
"""
from __future__ import annotations

import os
import pathlib
import shutil
from dataclasses import dataclass

import numpy as np

MEMORY_BYTES = 3 * 1024 * 1024  # outputs kept in memory, at most (loss_task's INLINE_OUTPUT_BYTES)


@dataclass(frozen=True)
class _Entry:
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class OutputSpool:
    """Appends arrays and reads them back by index: in memory while they hold at most
    `memory_bytes`, in `path` from the append that takes them past it."""

    def __init__(self, path: pathlib.Path, memory_bytes: int = MEMORY_BYTES):
        self.path = path
        self.memory_bytes = memory_bytes
        self._file = None
        self._held: list[np.ndarray] | None = []  # the arrays, until they move to the file
        self._entries: list[_Entry] = []
        self._size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, arrays: list[np.ndarray]) -> None:
        arrays = [np.ascontiguousarray(array) for array in arrays]
        for array in arrays:
            self._entries.append(_Entry(self._size, array.shape, array.dtype))
            self._size += array.nbytes
        if self._held is not None:
            self._held.extend(arrays)
            if self._size <= self.memory_bytes:
                return
            arrays, self._held = self._held, None  # past the limit: every array so far goes to the file
        if self._file is None:
            self._file = open(self.path, "w+b")  # noqa: SIM115 - closed by remove()
        for array in arrays:
            self._file.write(array.data)
        self._file.flush()

    def read(self, start: int, max_bytes: int) -> list[np.ndarray]:
        """The arrays from index `start` that fit max_bytes together (at least one)."""
        end, size = start, 0
        while end < len(self._entries) and (end == start or size + self._entries[end].nbytes <= max_bytes):
            size += self._entries[end].nbytes
            end += 1
        if end == start:
            return []
        if self._held is not None:
            return self._held[start:end]
        first = self._entries[start]
        data = os.pread(self._file.fileno(), size, first.offset)
        return [np.frombuffer(data, dtype=entry.dtype, count=entry.nbytes // entry.dtype.itemsize,
                              offset=entry.offset - first.offset).reshape(entry.shape)
                for entry in self._entries[start:end]]

    def remove(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
        self._held, self._entries = [], []


def fresh_folder(folder: pathlib.Path) -> pathlib.Path:
    """An empty `folder` for spools (files an earlier process left are deleted)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
