"""The PNG writer: a valid file that decodes back to the pixels written (zlib, no library)."""

import struct
import zlib

import numpy as np
import pytest

from lcjax.rl.plot import line_plot, write_png


def read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n: pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * (3 * w + 1): (y + 1) * (3 * w + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return np.frombuffer(b"".join(r[1:] for r in rows), np.uint8).reshape(h, w, 3)


def test_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), img)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "b.png", img.astype(np.float32))


def test_line_plot_draws_rising_curve(tmp_path):
    line_plot(tmp_path / "r.png", [0.0, 0.1, float("nan"), 0.5, 0.9], size=(100, 60), smooth=2)
    img = read_png(tmp_path / "r.png")
    dark = np.argwhere((img[..., 2] > 150) & (img[..., 0] < 60))  # the moving average
    assert len(dark) > 10
    left = dark[dark[:, 1] < 50][:, 0].mean()
    right = dark[dark[:, 1] > 70][:, 0].mean()
    assert right < left  # rising curve: smaller row index (higher) on the right
