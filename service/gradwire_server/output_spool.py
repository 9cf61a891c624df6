"""Per-datum outputs of one forward(-backward) operation, kept in a file.

A streamed batch of any size computes outputs (logprobs [N] or [N, K] per
datum) as it goes; holding them in memory until the client reads them would
make the server's memory grow with the dataset. They are appended to one file
per operation instead (under the checkpoint folder), read back in chunks by
ReadOutputs, and the file is removed with the operation. Used on the event
loop only.
"""
from __future__ import annotations

import os
import pathlib
import shutil
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Entry:
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class OutputSpool:
    """Appends arrays to `path` and reads them back by index."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._file = None
        self._entries: list[_Entry] = []
        self._size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, arrays: list[np.ndarray]) -> None:
        if self._file is None:
            self._file = open(self.path, "w+b")  # noqa: SIM115 - closed by remove()
        for array in arrays:
            data = np.ascontiguousarray(array)
            self._entries.append(_Entry(self._size, data.shape, data.dtype))
            self._file.write(data.data)
            self._size += data.nbytes
        self._file.flush()

    def read(self, start: int, max_bytes: int) -> list[np.ndarray]:
        """The arrays from index `start` that fit max_bytes together (at least one)."""
        end, size = start, 0
        while end < len(self._entries) and (end == start or size + self._entries[end].nbytes <= max_bytes):
            size += self._entries[end].nbytes
            end += 1
        if end == start:
            return []
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
        self._entries = []


def fresh_folder(folder: pathlib.Path) -> pathlib.Path:
    """An empty `folder` for spools (files an earlier process left are deleted)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
