"""Fast reads of one HDF5 chunk (= one cache sample's images) without HDF5's filter pipeline.

HDF5 inflates a gzip chunk with zlib into a buffer it grows by doubling, checks the
Fletcher-32 sum and copies the result out; for the cache's 0.8 MB image chunks that is most of
a sample's read time. Here the stored bytes come from `read_direct_chunk` and the filters are
undone in reverse order of the dataset's pipeline (the cache writes deflate, then fletcher32):

- fletcher32: HDF5 appends the checksum of the (compressed) bytes before it, little-endian
  uint32 (sum2 << 16 | sum1 over big-endian 16-bit words, one's-complement sums mod 65535);
  verified here in numpy, accepting the byte-swapped form HDF5 < 1.6.3 wrote, as HDF5 does.
- deflate: a zlib stream (its Adler-32 is checked by the inflater), inflated by libdeflate
  (the `deflate` package, about 2x faster than zlib here) or, when that is not installed, by
  the standard library's zlib, into a buffer of the exact chunk size.

A chunk whose deflate step HDF5 skipped (the filter is optional: incompressible data is stored
raw) is marked in the chunk's filter mask and is not inflated. A dataset with any other filter,
or not one sample per chunk, is read through h5py as usual.
"""

from __future__ import annotations

import zlib

import h5py
import numpy as np

try:  # libdeflate: optional, the standard library's zlib is the fallback
    import deflate as _libdeflate
except ImportError:  # pragma: no cover - depends on the environment
    _libdeflate = None
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (zlib.error, ValueError, RuntimeError) + (
    (_libdeflate.DeflateError,) if hasattr(_libdeflate, "DeflateError") else ())

FLETCHER_ROW = 1024  # words per row of the checksum's matrix
FLETCHER_BLOCK = FLETCHER_ROW << 16  # words per pass: its uint32 column sums cannot overflow
_HANDLED = {h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_FLETCHER32}


class ChunkError(ValueError):
    """A chunk failed its checksum or could not be inflated."""


def _weighted_sums(words: np.ndarray) -> tuple[int, int]:
    """(sum of w_i, sum of i·w_i) of big-endian uint16 words, exactly: the words as a
    (rows, FLETCHER_ROW) matrix, i = row·FLETCHER_ROW + column, summed along both axes with
    uint32 accumulators (at most 2^16 rows per call: no overflow) plus the short tail."""
    rows = words.size // FLETCHER_ROW
    matrix = words[:rows * FLETCHER_ROW].reshape(rows, FLETCHER_ROW)
    row_sums = matrix.sum(axis=1, dtype=np.uint32).astype(np.int64)
    column_sums = matrix.sum(axis=0, dtype=np.uint32).astype(np.int64)
    tail = words[rows * FLETCHER_ROW:].astype(np.int64)
    total = int(row_sums.sum()) + int(tail.sum())
    weighted = (FLETCHER_ROW * int(row_sums @ np.arange(rows))
                + int(column_sums @ np.arange(FLETCHER_ROW))
                + int(tail @ np.arange(rows * FLETCHER_ROW, words.size)))
    return total, weighted


def fletcher32(data: bytes | memoryview) -> int:
    """HDF5's Fletcher-32 of `data` (H5_checksum_fletcher32), vectorised.

    Over the n big-endian 16-bit words w_i: sum1 = Σ w_i, sum2 = Σ_i (sum1 after word i)
    = Σ (n − i)·w_i, both folded to [1, 65535] (0 only when the data are all zero); an odd last
    byte counts as a last word's high byte.
    """
    data = memoryview(data).cast("B")
    n_words = len(data) // 2
    words = np.frombuffer(data, dtype=">u2", count=n_words)
    sum1 = weighted = 0
    for start in range(0, n_words, FLETCHER_BLOCK):
        total, local = _weighted_sums(words[start:start + FLETCHER_BLOCK])
        sum1, weighted = sum1 + total, weighted + local + start * total
    sum2 = n_words * sum1 - weighted
    if len(data) % 2:
        sum1 += data[-1] << 8
        sum2 += sum1

    def fold(total: int) -> int:  # one's-complement mod 65535: a non-zero total never folds to 0
        rest = total % 65535
        return 65535 if rest == 0 and total > 0 else rest

    return (fold(sum2) << 16) | fold(sum1)


def _swapped(checksum: int) -> int:
    """The checksum with the bytes of each 16-bit half swapped (HDF5 < 1.6.3)."""
    return ((checksum & 0x00FF00FF) << 8) | ((checksum >> 8) & 0x00FF00FF)


def inflate(data: bytes | memoryview, size: int) -> bytearray | bytes:
    """The zlib stream `data` inflated to exactly `size` bytes (else ChunkError)."""
    try:
        if _libdeflate is not None:
            out = _libdeflate.zlib_decompress(data, size)
        else:
            out = zlib.decompress(data, bufsize=size)
    except _INFLATE_ERRORS as err:
        raise ChunkError(f"decompression failed: {err}") from None
    if len(out) != size:
        raise ChunkError(f"chunk inflates to {len(out)} bytes, expected {size}")
    return out


def inflater() -> str:
    """Which inflater `inflate` uses: 'libdeflate' or 'zlib'."""
    return "zlib" if _libdeflate is None else "libdeflate"


class ChunkReader:
    """Reads dataset[row] for a dataset chunked one row per chunk: (shape[1:]) arrays."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.shape = dataset.shape[1:]
        self.dtype = dataset.dtype
        self.nbytes = int(np.prod(self.shape)) * dataset.dtype.itemsize
        plist = dataset.id.get_create_plist()
        self.filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        self.direct = (dataset.chunks == (1, *self.shape) and set(self.filters) <= _HANDLED
                       and dataset.dtype.itemsize == 1)  # no byte order to mind
        self._offset = (0,) * len(self.shape)

    def read(self, row: int) -> np.ndarray:
        """The row's array (writable when libdeflate or no filter made it); raises ChunkError
        (or h5py's own errors on the fallback path) when the chunk is corrupt."""
        if not self.direct:
            return self.dataset[row]
        mask, data = self.dataset.id.read_direct_chunk((row, *self._offset))
        data = memoryview(data)
        for index in reversed(range(len(self.filters))):
            if mask & (1 << index):  # HDF5 skipped this (optional) filter for the chunk
                continue
            if self.filters[index] == h5py.h5z.FILTER_FLETCHER32:
                if len(data) < 4:
                    raise ChunkError("chunk shorter than its checksum")
                stored = int.from_bytes(data[-4:], "little")
                data = data[:-4]
                computed = fletcher32(data)
                if stored not in (computed, _swapped(computed)):
                    raise ChunkError(f"Fletcher-32 checksum mismatch (stored {stored:#010x}, "
                                     f"computed {computed:#010x})")
            else:
                data = memoryview(inflate(data, self.nbytes))
        if len(data) != self.nbytes:
            raise ChunkError(f"chunk holds {len(data)} bytes, expected {self.nbytes}")
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape)
