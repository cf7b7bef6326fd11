"""openpi's wire codec: msgpack with numpy arrays as maps, and nothing that could run code.

An array travels as ``{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str,
b"shape": shape}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": value,
b"dtype": dtype.str}`` (the keys are msgpack ``bin``, as openpi-client's ``msgpack_numpy``
writes them), so vlakit's server and the unmodified ``openpi-client`` read each other's
frames. Object, void and complex dtypes are refused both ways: no pickle, no arbitrary
objects. Decoded arrays are read-only views of the frame (copy before writing to them).
"""

from typing import Any

import msgpack
import numpy as np

__all__ = ["packb", "unpackb", "CodecError"]

_REFUSED_KINDS = ("O", "V", "c")


class CodecError(ValueError):
    """A frame that is not openpi's msgpack-numpy, or an array of a refused dtype."""


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind in _REFUSED_KINDS:
        raise CodecError(f"{where}: dtype {dtype} (kind {dtype.kind!r}) is refused: object, "
                         f"void and complex arrays could carry arbitrary objects")


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype, "an array to send")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(),
                b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype, "a numpy scalar to send")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire: send numpy arrays, "
                    f"numbers, strings, lists and dicts")


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            _check_dtype(dtype, "a received array")
            shape = tuple(int(n) for n in obj[b"shape"])
            return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=shape)
        except CodecError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise CodecError(f"a malformed array in the frame: {error}") from None
    if b"__npgeneric__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            _check_dtype(dtype, "a received numpy scalar")
            return dtype.type(obj[b"data"])
        except CodecError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise CodecError(f"a malformed numpy scalar in the frame: {error}") from None
    return obj


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (dicts, lists, strings, numbers, numpy arrays and scalars) as one
    frame, byte for byte as openpi-client's ``msgpack_numpy.packb``."""
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes, max_bytes: int | None = None) -> Any:
    """Decode one frame. ``max_bytes``: refuse a larger frame before reading it."""
    if max_bytes is not None and len(data) > max_bytes:
        raise CodecError(f"the frame is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        return msgpack.unpackb(data, object_hook=_decode, strict_map_key=False)
    except CodecError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as error:
        raise CodecError(f"not a msgpack frame: {type(error).__name__}: {error}") from None
