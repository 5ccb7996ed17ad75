"""The direct chunk reader: same arrays as h5py, checksum and inflate errors detected."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.data.cache import chunks as chunk_reader
from pipeline.data.cache.chunks import ChunkError, ChunkReader, fletcher32


@pytest.fixture(autouse=True, params=["libdeflate", "zlib"])
def inflater(request, monkeypatch):
    """Every test with libdeflate (when installed) and with the standard library's zlib."""
    if request.param == "zlib":
        monkeypatch.setattr(chunk_reader, "_libdeflate", None)
    elif chunk_reader._libdeflate is None:
        pytest.skip("the deflate package is not installed")
    assert chunk_reader.inflater() == request.param
    return request.param


def make(path, data: np.ndarray, **filters) -> None:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("x", data=data, chunks=(1, *data.shape[1:]), **filters)


def images(n: int = 5, shape=(3, 17, 23, 3), seed: int = 0) -> np.ndarray:
    """Smooth images plus noise (compressible but not trivially), odd byte counts."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, shape[-2], dtype=np.float32)[None, None, :, None]
    return np.clip(ramp + rng.normal(0, 8, (n, *shape)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("filters", [
    {"compression": "gzip", "compression_opts": 4, "fletcher32": True},
    {"compression": "gzip"},
    {"fletcher32": True},
    {},
])
def test_reads_equal_h5py(tmp_path, filters):
    data = images()
    make(tmp_path / "a.h5", data, **filters)
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        reader = ChunkReader(h5["x"])
        assert reader.direct
        for row in range(len(data)):
            assert np.array_equal(reader.read(row), data[row])


def test_other_filters_fall_back_to_h5py(tmp_path):
    data = images()
    make(tmp_path / "a.h5", data, compression="gzip", shuffle=True)
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        reader = ChunkReader(h5["x"])
        assert not reader.direct
        assert np.array_equal(reader.read(2), data[2])


def test_fletcher32_matches_what_hdf5_stored(tmp_path):
    for n_bytes in (1, 2, 3, 1001, 4096, 70001):  # odd tails and several matrix rows
        data = np.random.default_rng(n_bytes).integers(0, 256, (2, n_bytes), dtype=np.uint8)
        make(tmp_path / "f.h5", data, fletcher32=True)
        with h5py.File(tmp_path / "f.h5", "r") as h5:
            _, raw = h5["x"].id.read_direct_chunk((1, 0))
        assert fletcher32(raw[:-4]) == int.from_bytes(raw[-4:], "little"), n_bytes


@pytest.mark.parametrize("filters", [
    {"compression": "gzip", "fletcher32": True}, {"fletcher32": True}, {"compression": "gzip"},
])
def test_a_flipped_byte_is_detected(tmp_path, filters):
    data = images()
    path = tmp_path / "a.h5"
    make(path, data, **filters)
    with h5py.File(path, "r") as h5:
        info = h5["x"].id.get_chunk_info(3)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0x5A
    path.write_bytes(bytes(raw))
    with h5py.File(path, "r") as h5:
        reader = ChunkReader(h5["x"])
        assert np.array_equal(reader.read(2), data[2])  # the other chunks are fine
        with pytest.raises(ChunkError):
            reader.read(3)
