"""vasipc.frames: the frame-export header (docs/contract.md 5.1), writers and pixel encoders (5.3)."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from vasipc import frames
from vasipc.frames import HEADER_SIZE, FrameHeader

cv2 = pytest.importorskip("cv2")

HEADER = FrameHeader(version=1, frame_id=0x0102030405060708, timestamp_ns=1_700_000_000_123_456_789,
                     width=1920, height=1080, pixel_format=frames.NV12, stride=2048,
                     data_size=2048 * 1620)


# --- header ----------------------------------------------------------------------------------

def test_header_round_trip():
    packed = HEADER.pack()
    assert len(packed) == HEADER_SIZE == 64
    assert FrameHeader.unpack(packed) == HEADER
    assert FrameHeader.unpack(bytearray(packed) + b"extra") == HEADER


@pytest.mark.parametrize(("offset", "fmt", "field"), [
    (0, "<I", "version"), (8, "<Q", "frame_id"), (16, "<Q", "timestamp_ns"),
    (24, "<I", "width"), (28, "<I", "height"), (32, "<I", "pixel_format"),
    (36, "<I", "stride"), (40, "<Q", "data_size"),
])
def test_header_field_offsets(offset, fmt, field):
    (value,) = struct.unpack_from(fmt, HEADER.pack(), offset)
    assert value == getattr(HEADER, field)


def test_header_padding_and_reserved_are_zero():
    packed = HEADER.pack()
    assert packed[4:8] == bytes(4)
    assert packed[48:64] == bytes(16)


def test_header_unpack_ignores_padding_and_reserved():
    packed = bytearray(HEADER.pack())
    packed[4:8] = b"\xff" * 4
    packed[48:64] = b"\xee" * 16
    assert FrameHeader.unpack(packed) == HEADER


def test_header_unpack_short_buffer():
    with pytest.raises(ValueError, match="64"):
        FrameHeader.unpack(HEADER.pack()[:63])


def test_parse_format():
    assert frames.PIXEL_FORMATS == {"NV12": 0, "I420": 1, "BGR24": 2, "RGB24": 3, "NV21": 4,
                                    "BGRA": 5, "BGRx": 6, "RGBA": 7, "RGBx": 8, "GRAY8": 9}
    from vasipc._fast.letterbox import FORMAT_CODES
    assert FORMAT_CODES == frames.PIXEL_FORMATS
    # Ours, FFmpeg's pix_fmt and GStreamer's format names, in any case.
    spellings = {0: ["nv12", "NV12"], 1: ["I420", "i420", "yuv420p", "YUV420P"],
                 2: ["BGR24", "bgr24", "bgr", "BGR", "Bgr"], 3: ["rgb24", "RGB", "Rgb", "rgb"],
                 4: ["nv21", "NV21"], 5: ["bgra", "BGRA"], 6: ["BGRx", "bgr0", "BGRX", "bgrx"],
                 7: ["rgba", "RGBA"], 8: ["RGBx", "rgb0", "RGB0"],
                 9: ["GRAY8", "gray8", "gray", "GRAY"]}
    for code, names in spellings.items():
        assert [frames.parse_format(name) for name in names] == [code] * len(names), names
    for bad in ("YUYV", "", "P010", "ARGB", "gray16le", "BGR 24", "yuv420p10le"):
        with pytest.raises(ValueError, match="unknown pixel format"):
            frames.parse_format(bad)


def test_frame_size():
    assert frames.frame_size(640, 480, "NV12") == 640 * 480 * 3 // 2
    assert frames.frame_size(640, 480, "I420", stride=704) == 704 * 480 + 2 * 352 * 240
    assert frames.frame_size(640, 480, "BGR24") == 640 * 480 * 3


# --- writers ---------------------------------------------------------------------------------

def test_write_frame_dir(tmp_path):
    target = tmp_path / "cam1" / "frame_42"  # parent directories are created
    data = np.arange(64 * 48 * 3 // 2, dtype=np.uint32).astype(np.uint8)
    header = frames.write_frame_dir(target, data, width=64, height=48, pixel_format="nv12",
                                    frame_id=42, timestamp_ns=123)
    assert header == FrameHeader(1, 42, 123, 64, 48, frames.NV12, 64, data.size)
    assert (target / "frame.data").read_bytes() == data.tobytes()
    assert FrameHeader.unpack((target / "frame.meta").read_bytes()) == header
    assert sorted(os.listdir(target)) == ["frame.data", "frame.meta"]  # no temp files left


def test_write_frame_dir_replaces_atomically(tmp_path, monkeypatch):
    frames.write_frame_dir(tmp_path, b"old" * 8, width=2, height=2, pixel_format="RGB", frame_id=1)
    data_inode = os.stat(tmp_path / "frame.data").st_ino
    header = frames.write_frame_dir(tmp_path, bytearray(b"new" * 8), width=2, height=2,
                                    pixel_format=frames.BGR24, stride=6, frame_id=2)
    assert header.timestamp_ns > 0 and header.stride == 6 and header.pixel_format == 2
    # A rename gives a new inode: readers holding the old file keep reading old bytes.
    assert os.stat(tmp_path / "frame.data").st_ino != data_inode
    assert (tmp_path / "frame.data").read_bytes() == b"new" * 8
    assert FrameHeader.unpack((tmp_path / "frame.meta").read_bytes()).frame_id == 2

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        frames.write_frame_dir(tmp_path, b"x" * 12, width=2, height=2, pixel_format="RGB")
    assert sorted(os.listdir(tmp_path)) == ["frame.data", "frame.meta"]  # temp file cleaned up


def test_write_frame_dir_writes_data_before_meta(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace",
                        lambda src, dst: (renamed.append(os.path.basename(dst)),
                                          real_replace(src, dst)))
    frames.write_frame_dir(tmp_path, b"\0" * 6, width=2, height=2, pixel_format="NV12")
    assert renamed == ["frame.data", "frame.meta"]


def test_write_raw_frame_ring(tmp_path):
    ring = tmp_path / "ring.raw"
    frames.write_raw_frame(ring, b"a" * 10)
    frames.write_raw_frame(ring, np.full(10, ord("b"), np.uint8), offset=10)
    frames.write_raw_frame(ring, b"c" * 5, offset=2)
    assert ring.read_bytes() == b"aacccccaaa" + b"b" * 10


def test_write_raw_frame_at_offset_zero_leaves_exactly_one_frame(tmp_path):
    # The server refuses a file read without an offset unless it is exactly one frame.
    raw = tmp_path / "frame.raw"
    frames.write_raw_frame(raw, b"x" * 30)
    frames.write_raw_frame(raw, b"y" * 12)
    assert raw.read_bytes() == b"y" * 12


# --- encoders --------------------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "to_rgb"), [("NV12", "COLOR_YUV2RGB_NV12"),
                                             ("I420", "COLOR_YUV2RGB_I420")])
def test_yuv_round_trip_through_opencv(astronaut_rgb, fmt, to_rgb):
    height, width = astronaut_rgb.shape[:2]
    encoded = frames.encode_frame(astronaut_rgb, fmt)
    assert encoded.dtype == np.uint8 and encoded.size == width * height * 3 // 2
    back = cv2.cvtColor(encoded.reshape(height * 3 // 2, width), getattr(cv2, to_rgb))
    assert np.abs(back.astype(np.int16) - astronaut_rgb).mean() < 2


def test_i420_matches_opencv_encoder(astronaut_rgb):
    reference = cv2.cvtColor(astronaut_rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    ours = frames.rgb_to_i420(astronaut_rgb)
    assert np.abs(ours.astype(np.int16) - reference).max() <= 1


def test_nv12_is_i420_with_interleaved_chroma(astronaut_rgb):
    height, width = astronaut_rgb.shape[:2]
    i420 = frames.rgb_to_i420(astronaut_rgb)
    nv12 = frames.rgb_to_nv12(astronaut_rgb)
    luma = width * height
    assert np.array_equal(nv12[:luma], i420[:luma])
    quarter = luma // 4
    assert np.array_equal(nv12[luma::2], i420[luma:luma + quarter])
    assert np.array_equal(nv12[luma + 1::2], i420[luma + quarter:])


@pytest.mark.parametrize("fmt", list(frames.PIXEL_FORMATS))
def test_padded_stride_keeps_pixels(astronaut_rgb, fmt):
    height, width = astronaut_rgb.shape[:2]
    packed_stride = frames.packed_stride(width, fmt)
    stride = packed_stride + 64
    packed = frames.encode_frame(astronaut_rgb, fmt)
    padded = frames.encode_frame(astronaut_rgb, fmt, stride=stride)
    assert padded.size == frames.frame_size(width, height, fmt, stride)
    rows = padded[: stride * height].reshape(height, stride)
    assert np.array_equal(rows[:, :packed_stride],
                          packed[: packed_stride * height].reshape(height, packed_stride))


def test_rgb_and_bgr_layouts():
    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8)
    assert frames.encode_frame(rgb, "RGB").tolist() == [1, 2, 3, 4, 5, 6]
    assert frames.encode_frame(rgb, "BGR24").tolist() == [3, 2, 1, 6, 5, 4]
    assert frames.encode_frame(rgb, "bgra").tolist() == [3, 2, 1, 255, 6, 5, 4, 255]
    assert frames.encode_frame(rgb, "BGRx").tolist() == [3, 2, 1, 255, 6, 5, 4, 255]
    assert frames.encode_frame(rgb, "RGBA").tolist() == [1, 2, 3, 255, 4, 5, 6, 255]
    assert frames.encode_frame(rgb, "rgb0").tolist() == [1, 2, 3, 255, 4, 5, 6, 255]
    white_red = np.array([[[255, 255, 255], [255, 0, 0]]], dtype=np.uint8)
    assert frames.encode_frame(white_red, "GRAY8").tolist() == [255, 76]  # BT.601: 0.299 * 255


def test_nv21_is_nv12_with_the_pairs_swapped(astronaut_rgb):
    nv12 = frames.encode_frame(astronaut_rgb, "NV12")
    nv21 = frames.encode_frame(astronaut_rgb, "NV21")
    luma = astronaut_rgb.shape[0] * astronaut_rgb.shape[1]
    assert np.array_equal(nv12[:luma], nv21[:luma])
    assert np.array_equal(nv12[luma::2], nv21[luma + 1::2])
    assert np.array_equal(nv12[luma + 1::2], nv21[luma::2])


def test_encoder_rejects_bad_input(astronaut_rgb):
    with pytest.raises(ValueError, match="even"):
        frames.rgb_to_nv12(astronaut_rgb[:-1])
    with pytest.raises(ValueError, match="even"):
        frames.rgb_to_i420(astronaut_rgb[:, :-1])
    with pytest.raises(ValueError, match="even"):
        frames.encode_frame(astronaut_rgb[:-1], "NV21")
    with pytest.raises(ValueError, match="stride"):
        frames.encode_frame(astronaut_rgb, "NV12", stride=astronaut_rgb.shape[1] - 2)
    with pytest.raises(ValueError, match="stride"):
        frames.encode_frame(astronaut_rgb, "I420", stride=astronaut_rgb.shape[1] + 1)
    with pytest.raises(ValueError):
        frames.encode_frame(astronaut_rgb.astype(np.float32), "RGB")
    with pytest.raises(ValueError):
        frames.encode_frame(astronaut_rgb, "YUYV")
    assert frames.crop_even(astronaut_rgb[:-1, :-1]).shape[:2] == (
        astronaut_rgb.shape[0] - 2, astronaut_rgb.shape[1] - 2)


@pytest.mark.parametrize("fmt", list(frames.PIXEL_FORMATS))
def test_writer_sizes_agree_with_the_server_kernel(fmt):
    """The producer-side size rules (pure Python) and the kernel's own bounds (C) are two
    spellings of docs/contract.md 5.3; they must never drift apart."""
    from vasipc._fast.letterbox import FORMAT_CODES, frame_nbytes, min_stride

    code = FORMAT_CODES[fmt]
    for width, height in [(2, 2), (640, 480), (1920, 1080), (3840, 2160), (1002, 6)]:
        packed = frames.packed_stride(width, fmt)
        assert packed == min_stride(code, width)
        for stride in (packed, packed + 2, packed + 64):
            assert frames.frame_size(width, height, fmt, stride) == frame_nbytes(
                code, width, height, stride)
