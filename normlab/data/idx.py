r"""Reader for the IDX file format (the format of the MNIST distribution files).

An IDX file is a 4-byte magic number, one big-endian ``uint32`` per dimension, then the array in
C order, big-endian:

.. code-block:: text

    byte 0-1   0x00 0x00
    byte 2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
               0x0E float64
    byte 3     number of dimensions n
    then       n big-endian uint32 sizes, then prod(sizes) elements

So MNIST images (``*-images-idx3-ubyte``) have magic ``0x00000803`` and labels
(``*-labels-idx1-ubyte``) ``0x00000801``. Files ending in ``.gz`` are decompressed on the fly.

Every malformed file raises :class:`ValueError` whose message names the file and the problem
(bad magic number, unknown element type, truncated header or data, trailing bytes, corrupt gzip
stream); a missing file raises :class:`FileNotFoundError`.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "idx_magic", "read_idx"]

#: IDX element-type byte -> big-endian NumPy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def idx_magic(type_code: int, ndim: int) -> int:
    """The magic number of an IDX file with element type ``type_code`` and ``ndim`` dimensions."""
    return (type_code << 8) | ndim


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {str(path)!r} does not exist")
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise ValueError(f"IDX file {str(path)!r}: corrupt gzip stream ({exc})") from exc


def read_idx(
    path: str | os.PathLike[str],
    *,
    expected_type: int | None = None,
    expected_ndim: int | None = None,
) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a native-endian NumPy array.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.
        expected_type: if given, the element-type byte the file must have (``0x08`` for MNIST).
        expected_ndim: if given, the number of dimensions the file must have (3 for images,
            1 for labels).

    Returns:
        An array of shape ``sizes`` from the header, in native byte order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: wrong magic number, unknown element type, truncated header or data, trailing
            bytes after the data, or a corrupt gzip stream. The message names the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    name = str(path)
    if len(raw) < 4:
        raise ValueError(
            f"IDX file {name!r} is truncated: {len(raw)} bytes, shorter than the 4-byte "
            "magic number"
        )
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"IDX file {name!r} has wrong magic number 0x{magic:08X}: expected 0x0000TTNN with "
            f"element type TT in {{{', '.join(f'{t:02X}' for t in IDX_DTYPES)}}} and NN >= 1 "
            "dimensions (e.g. 0x00000803 for images, 0x00000801 for labels)"
        )
    if expected_type is not None or expected_ndim is not None:
        want = idx_magic(
            type_code if expected_type is None else expected_type,
            ndim if expected_ndim is None else expected_ndim,
        )
        if magic != want:
            raise ValueError(
                f"IDX file {name!r} has wrong magic number 0x{magic:08X}: expected 0x{want:08X}"
            )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"IDX file {name!r} is truncated: header declares {ndim} dimensions "
            f"({header_len} header bytes) but the file has only {len(raw)} bytes"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[type_code]
    want_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have_bytes = len(raw) - header_len
    if have_bytes < want_bytes:
        raise ValueError(
            f"IDX file {name!r} is truncated: header declares shape {shape} "
            f"({want_bytes} data bytes) but only {have_bytes} data bytes follow"
        )
    if have_bytes > want_bytes:
        raise ValueError(
            f"IDX file {name!r} has {have_bytes - want_bytes} unexpected trailing bytes after the "
            f"{want_bytes} data bytes of shape {shape}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=want_bytes // dtype.itemsize, offset=header_len)
    return data.reshape(shape).astype(dtype.newbyteorder("="))
