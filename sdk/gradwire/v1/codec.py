"""Wire codec: numpy arrays <-> gradwire.v1 protobuf messages.

Part of the wire contract beside the generated stubs (hand-written, not
generated): the SDK and the server both import it, so neither reaches into
the other. Every conversion is one numpy call over a
whole buffer (no per-element Python), and decoding views the message's bytes
without copying where numpy allows it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradwire.v1 import datum_pb2, tensor_pb2

DType = tensor_pb2.DType

_NUMPY_OF_DTYPE = {
    DType.FLOAT32: np.dtype("<f4"),
    DType.INT64: np.dtype("<i8"),
    DType.INT32: np.dtype("<i4"),
}
_DTYPE_OF_NAME = {"float32": DType.FLOAT32, "int64": DType.INT64, "int32": DType.INT32,
                  "bfloat16": DType.BFLOAT16}
NAME_OF_DTYPE = {v: k for k, v in _DTYPE_OF_NAME.items()}
# The dtypes a readable encoding may declare (unset means its own).
_READABLE_DTYPES = {"int64_values": (DType.D_TYPE_UNSPECIFIED, DType.INT64, DType.INT32),
                    "float_values": (DType.D_TYPE_UNSPECIFIED, DType.FLOAT32)}
_INT32_LE = np.dtype("<i4")
_FLOAT32_LE = np.dtype("<f4")


MAX_DIMS = 8  # dimensions of a Tensor's shape; numpy itself stops at 64


class WireFormatError(ValueError):
    """A message whose bytes do not describe the array it claims to."""


def dtype_of_name(name: str) -> int:
    """The DType enum value of "float32", "int64", "int32" or "bfloat16"."""
    return _DTYPE_OF_NAME[name]


def tensor_to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    """Packs an int64/int32/float32 array densely (little-endian, row-major)."""
    name = array.dtype.name
    if name not in _DTYPE_OF_NAME or name == "bfloat16":
        raise TypeError(f"unsupported tensor dtype {array.dtype}; use int64 or float32")
    wire = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return tensor_pb2.Tensor(dense=np.ascontiguousarray(wire).tobytes(),
                             dtype=_DTYPE_OF_NAME[name], shape=array.shape)


def tensor_from_proto(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Decodes a Tensor in any of its encodings; raises WireFormatError if inconsistent."""
    encoding = tensor.WhichOneof("encoding")
    shape = tuple(tensor.shape)
    if encoding in _READABLE_DTYPES and tensor.dtype not in _READABLE_DTYPES[encoding]:
        raise WireFormatError(f"{encoding} cannot hold dtype {_dtype_name(tensor.dtype)}")
    if encoding == "int64_values":
        flat = np.asarray(tensor.int64_values.values, dtype=np.int64)
        return _reshape(flat, shape or (flat.size,))
    if encoding == "float_values":
        flat = np.asarray(tensor.float_values.values, dtype=np.float32)
        return _reshape(flat, shape or (flat.size,))
    if encoding == "sparse_csr":
        return _dense_from_csr(tensor.sparse_csr, tensor.dtype, shape)
    return _reshape(_frombuffer(tensor.dense, tensor.dtype), shape)


def pack_int32(values) -> bytes:
    """Little-endian int32 bytes of a sequence of integers."""
    return np.ascontiguousarray(values, dtype=_INT32_LE).tobytes()


def pack_float32(values) -> bytes:
    """Little-endian float32 bytes of a sequence of numbers."""
    return np.ascontiguousarray(values, dtype=_FLOAT32_LE).tobytes()


def unpack_int32(packed: bytes) -> list[int]:
    return np.frombuffer(packed, dtype=_INT32_LE).tolist()


def unpack_float32(packed: bytes) -> list[float]:
    return np.frombuffer(packed, dtype=_FLOAT32_LE).tolist()


def tokens_to_chunk(tokens: np.ndarray) -> datum_pb2.Chunk:
    """An encoded_text chunk with packed int32 token ids; TypeError / ValueError for ids that
    are not integers or do not fit int32 (a cast would change them silently)."""
    tokens = np.asarray(tokens)
    if tokens.size and tokens.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, not {tokens.dtype}")
    int32 = np.iinfo(_INT32_LE)
    outside = (tokens < int32.min) | (tokens > int32.max)
    if outside.any():
        raise ValueError(f"token id {tokens[outside][0]} (position {np.flatnonzero(outside)[0]}) does not fit "
                         "the wire's int32")
    return datum_pb2.Chunk(encoded_text=datum_pb2.EncodedTextChunk(tokens=pack_int32(tokens)))


def tokens_from_text_chunk(chunk: datum_pb2.EncodedTextChunk) -> np.ndarray:
    """Token ids of an encoded_text chunk as int64 (packed or readable form)."""
    if chunk.tokens and chunk.token_ids:
        raise WireFormatError("set either tokens or token_ids, not both")
    if chunk.token_ids:
        return np.asarray(chunk.token_ids, dtype=np.int64)
    if len(chunk.tokens) % 4:
        raise WireFormatError(f"tokens has {len(chunk.tokens)} bytes, not a multiple of 4 (int32)")
    return np.frombuffer(chunk.tokens, dtype=_INT32_LE).astype(np.int64)


def batched_to_proto(arrays: Sequence[np.ndarray]) -> tensor_pb2.BatchedTensor:
    """Concatenates per-datum arrays that share dtype and trailing shape."""
    first = arrays[0]
    wire_dtype = first.dtype.newbyteorder("<")
    data = np.concatenate([a.reshape(-1) for a in arrays]).astype(wire_dtype, copy=False)
    sizes = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype="<i8")
    np.cumsum(sizes * first.dtype.itemsize, out=offsets[1:])
    return tensor_pb2.BatchedTensor(data=data.tobytes(), offsets=offsets.tobytes(),
                                    dtype=_DTYPE_OF_NAME[first.dtype.name],
                                    trailing_shape=first.shape[1:])


def batched_from_proto(batched: tensor_pb2.BatchedTensor) -> list[np.ndarray]:
    """Splits a BatchedTensor back into per-datum arrays (views of one buffer)."""
    flat = _frombuffer(batched.data, batched.dtype)
    offsets = np.frombuffer(batched.offsets, dtype="<i8") // flat.dtype.itemsize
    trailing = tuple(batched.trailing_shape)
    return [flat[start:stop].reshape((-1, *trailing))
            for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _frombuffer(buffer: bytes, dtype: int) -> np.ndarray:
    if dtype == DType.BFLOAT16:
        if len(buffer) % 2:
            raise WireFormatError("bfloat16 data has an odd number of bytes")
        # bfloat16 is the upper half of a float32: widen losslessly.
        return (np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype not in _NUMPY_OF_DTYPE:
        raise WireFormatError(f"unsupported dtype {_dtype_name(dtype)}")
    numpy_dtype = _NUMPY_OF_DTYPE[dtype]
    if len(buffer) % numpy_dtype.itemsize:
        raise WireFormatError(
            f"{len(buffer)} bytes is not a whole number of {NAME_OF_DTYPE[dtype]} elements")
    return np.frombuffer(buffer, dtype=numpy_dtype)


def _dtype_name(dtype: int) -> str:
    return DType.Name(dtype) if dtype in DType.values() else str(dtype)


def decoded_nbytes(tensor: tensor_pb2.Tensor) -> int | None:
    """Bytes tensor_from_proto would allocate for this tensor, known before decoding
    it (None if the shape is unusable); a receiver checks it against its limits
    before decoding anything."""
    shape = tuple(tensor.shape)
    encoding = tensor.WhichOneof("encoding")
    if not shape:
        if encoding == "int64_values":
            return 8 * len(tensor.int64_values.values)
        if encoding == "float_values":
            return 4 * len(tensor.float_values.values)
    if any(d < 0 for d in shape) or len(shape) > MAX_DIMS:
        return None
    itemsize = 8 if encoding == "int64_values" or (encoding != "float_values" and tensor.dtype == DType.INT64) else 4
    size = itemsize
    for d in shape:
        size *= d  # Python ints: no overflow
    return size


def _reshape(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) > MAX_DIMS:
        raise WireFormatError(f"shape has {len(shape)} dimensions, at most {MAX_DIMS} are supported")
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.int64)) != flat.size:
        raise WireFormatError(f"{flat.size} elements do not fill shape {list(shape)}")
    return flat.reshape(shape)


def _dense_from_csr(csr: tensor_pb2.SparseCsr, dtype: int, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) != 2 or min(shape) < 0:
        raise WireFormatError(f"sparse_csr needs a 2-D shape of sizes >= 0, got {list(shape)}")
    values = _frombuffer(csr.values, dtype)
    crow = _frombuffer(csr.crow_indices, DType.INT64)
    cols = _frombuffer(csr.col_indices, DType.INT64)
    rows, width = shape
    if (crow.size != rows + 1 or cols.size != values.size or crow[0] != 0 or crow[-1] != values.size
            or np.any(np.diff(crow) < 0) or np.any((cols < 0) | (cols >= width))):
        raise WireFormatError("sparse_csr indices are inconsistent with its shape")
    dense = np.zeros(shape, dtype=values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), cols] = values
    return dense
