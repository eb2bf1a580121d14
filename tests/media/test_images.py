"""Tests for retrieval.media.images: every input is generated in tmp_path (or memory) by the test itself."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from retrieval.media.images import ImageDecodeError, load_image, to_rgb

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 255)


def close_to(actual, expected, tol: int = 0) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def assert_rgb(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.mode == "RGB"
    assert image.size == size
    image.load()  # the returned image must still hold usable pixel data


def assert_short_message(error: pytest.ExceptionInfo) -> str:
    # A reason shown to a user: one line, no traceback dump.
    message = str(error.value)
    assert message and "\n" not in message and len(message) < 250
    return message


def png_header_only(path, width: int, height: int, bit_depth: int = 1, colour_type: int = 0,
                    idat: bytes = b"") -> None:
    """Write a PNG by hand, so huge dimensions cost nothing to create."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# --- formats ------------------------------------------------------------------------------------

FORMATS = [  # (extension, save kwargs, colour tolerance: lossy JPEG drifts a little)
    ("jpg", {}, 8),
    ("jpeg", {}, 8),
    ("png", {}, 0),
    pytest.param("webp", {"lossless": True}, 0,
                 marks=pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")),
    ("bmp", {}, 0),
    ("gif", {}, 0),
    ("tiff", {}, 0),
]


@pytest.mark.parametrize("ext,save_kwargs,tol", FORMATS)
def test_each_format_loads_as_rgb_of_the_right_size(tmp_path, ext, save_kwargs, tol):
    # Odd, non-square size catches width/height swaps; two halves check the pixels too.
    source = Image.new("RGB", (37, 23), RED)
    source.paste(BLUE, (19, 0, 37, 23))
    path = tmp_path / f"picture.{ext}"
    source.save(path, **save_kwargs)

    image = load_image(path)

    assert_rgb(image, (37, 23))
    assert close_to(image.getpixel((4, 11)), RED, tol)
    assert close_to(image.getpixel((32, 11)), BLUE, tol)


@pytest.mark.parametrize("ext", [
    "gif",
    "png",  # APNG
    pytest.param("webp", marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP")),
])
def test_animation_returns_first_frame(tmp_path, ext):
    path = tmp_path / f"anim.{ext}"
    frames = [Image.new("RGB", (16, 12), RED), Image.new("RGB", (16, 12), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    with Image.open(path) as check:  # the file really is animated, with a blue second frame
        assert check.n_frames == 2
        check.seek(1)
        assert close_to(check.convert("RGB").getpixel((8, 6)), BLUE, 2)

    image = load_image(path)

    assert_rgb(image, (16, 12))
    assert close_to(image.getpixel((8, 6)), RED, 2)


def test_accepts_str_path_and_file_object(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (9, 7), GREEN).save(path)

    from_str = load_image(str(path))
    from_file = load_image(io.BytesIO(path.read_bytes()))

    for image in (from_str, from_file):
        assert_rgb(image, (9, 7))
        assert image.getpixel((3, 3)) == GREEN


def test_file_object_errors_are_decode_errors():
    with pytest.raises(ImageDecodeError):
        load_image(io.BytesIO(b"definitely not an image"))


# --- EXIF orientation ---------------------------------------------------------------------------

def jpeg_with_marked_corner(path, orientation=None, exif: bytes | None = None) -> None:
    """A 40x20 white JPEG whose stored top-left 8x8 block is red."""
    image = Image.new("RGB", (40, 20), WHITE)
    image.paste(RED, (0, 0, 8, 8))
    if orientation is not None:
        tags = Image.Exif()
        tags[0x0112] = orientation
        exif = tags.tobytes()
    image.save(path, quality=95, **({"exif": exif} if exif is not None else {}))


@pytest.mark.parametrize("orientation,size,red_at,white_at", [
    (1, (40, 20), (3, 3), (36, 16)),     # no-op
    (3, (40, 20), (36, 16), (3, 3)),     # rotate 180: corner goes bottom-right
    (6, (20, 40), (16, 3), (3, 3)),      # rotate 90 clockwise: top-left goes top-right
    (8, (20, 40), (3, 36), (3, 3)),      # rotate 90 counter-clockwise: top-left goes bottom-left
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, red_at, white_at):
    path = tmp_path / "oriented.jpg"
    jpeg_with_marked_corner(path, orientation)

    image = load_image(path)

    assert_rgb(image, size)
    assert close_to(image.getpixel(red_at), RED, 20)
    assert close_to(image.getpixel(white_at), WHITE, 20)


def exif_blob(entries: list[bytes]) -> bytes:
    """Raw big-endian EXIF: one IFD with the given 12-byte entries."""
    return (b"Exif\x00\x00MM\x00\x2a" + struct.pack(">IH", 8, len(entries)) + b"".join(entries)
            + struct.pack(">I", 0))


GARBAGE_EXIF = {
    "nonsense orientation": exif_blob([struct.pack(">HHIHH", 0x0112, 3, 1, 99, 0)]),
    "orientation as text": exif_blob([struct.pack(">HHI4s", 0x0112, 2, 4, b"six\x00")]),
    "random bytes after header": b"Exif\x00\x00" + bytes(range(7, 250, 3)),
    "bad IFD offset": b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0",
    "not TIFF at all": b"Exif\x00\x00XX garbage garbage",
    # Orientation 6 next to an integer tag (TileWidth) stored as text: Pillow reads it, but its
    # exif_transpose raises while re-serialising the EXIF, so this reaches the fallback path.
    "orientation with unwritable tag": exif_blob([struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0),
                                                  struct.pack(">HHI4s", 0x0142, 2, 4, b"abc\x00")]),
}


@pytest.mark.parametrize("blob", GARBAGE_EXIF.values(), ids=GARBAGE_EXIF.keys())
def test_garbage_exif_still_loads(tmp_path, blob):
    path = tmp_path / "odd_exif.jpg"
    jpeg_with_marked_corner(path, exif=blob)

    image = load_image(path)

    # Unreadable orientation means "leave as stored"; the pixels themselves must survive.
    assert image.mode == "RGB"
    assert image.size in ((40, 20), (20, 40))
    assert close_to(image.getpixel((3, 3)), RED, 20) or close_to(image.getpixel((16, 3)), RED, 20)


def test_unwritable_exif_really_breaks_pillows_exif_transpose(tmp_path):
    # Guards the "unwritable tag" case above: it only tests the fallback if PIL really raises.
    path = tmp_path / "odd_exif.jpg"
    jpeg_with_marked_corner(path, exif=GARBAGE_EXIF["orientation with unwritable tag"])
    with Image.open(path) as image:
        try:
            ImageOps.exif_transpose(image)
        except Exception:
            return
    pytest.skip("this Pillow copes with the unwritable tag; the fallback path is not exercised")


# --- mode conversions ---------------------------------------------------------------------------

def test_rgba_transparent_becomes_white_opaque_keeps_colour(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))      # fully transparent red: must not show as red
    image.putpixel((1, 0), (0, 0, 255, 255))    # opaque blue
    image.putpixel((2, 0), (0, 0, 0, 128))      # half-transparent black over white: mid grey
    path = tmp_path / "rgba.png"
    image.save(path)

    out = load_image(path)

    assert_rgb(out, (3, 1))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == BLUE
    assert close_to(out.getpixel((2, 0)), (127, 127, 127), 2)


def test_la_transparent_becomes_white(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (50, 0))
    image.putpixel((1, 0), (50, 255))
    path = tmp_path / "la.png"
    image.save(path)

    out = load_image(path)

    assert_rgb(out, (2, 1))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == (50, 50, 50)


def test_cmyk_jpeg_converts_to_rgb_colours(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    with Image.open(path) as check:
        assert check.mode == "CMYK"

    out = load_image(path)

    assert_rgb(out, (12, 10))
    assert close_to(out.getpixel((6, 5)), RED, 12)


def test_palette_png_with_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.putpixel((0, 0), 0)   # index 0 is the transparent one (black in the palette)
    image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    out = load_image(path)

    assert_rgb(out, (2, 1))
    assert out.getpixel((0, 0)) == WHITE   # not the palette's black
    assert out.getpixel((1, 0)) == RED


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    pixels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a wide mode, not already 8-bit

    out = load_image(path)

    assert_rgb(out, (3, 1))
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert close_to(out.getpixel((1, 0)), (127, 127, 127), 1)  # PIL's own convert gives 255
    assert out.getpixel((2, 0)) == WHITE


def test_to_rgb_i16_in_memory():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"

    out = to_rgb(image)

    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_32bit_int_tiff(tmp_path):
    path = tmp_path / "int32.tif"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)).save(path)
    with Image.open(path) as check:
        assert check.mode == "I"

    out = load_image(path)

    assert_rgb(out, (3, 1))
    # Same 16-bit scale as I;16: dark stays dark, mid is mid, the top is white (not all white).
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_float_tiff_scaled_by_its_range(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)).save(path)
    with Image.open(path) as check:
        assert check.mode == "F"

    out = load_image(path)

    assert_rgb(out, (3, 1))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_constant_float_image_does_not_crash():
    out = to_rgb(Image.new("F", (4, 3), 0.5))  # zero range: no division by zero
    assert out.mode == "RGB" and out.size == (4, 3)


def test_float_image_with_nan_keeps_finite_pixels():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    with np.errstate(invalid="ignore"):
        out = to_rgb(image)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_1bit_image(tmp_path):
    image = Image.new("1", (5, 4), 0)
    image.putpixel((2, 1), 1)
    path = tmp_path / "bilevel.png"
    image.save(path)

    out = load_image(path)

    assert_rgb(out, (5, 4))
    assert out.getpixel((2, 1)) == WHITE
    assert out.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["L", "P", "1", "RGBA", "LA", "PA", "CMYK", "YCbCr", "HSV",
                                  "I;16", "I", "F", "RGBa", "La"])
def test_to_rgb_any_mode_gives_rgb(mode):
    out = to_rgb(Image.new(mode, (6, 4)))
    assert out.mode == "RGB" and out.size == (6, 4)


def test_to_rgb_keeps_rgb_pixels():
    image = Image.new("RGB", (2, 2), GREEN)
    assert to_rgb(image).getpixel((1, 1)) == GREEN


# --- errors -------------------------------------------------------------------------------------

def _valid_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, fmt)  # noise: the data can't be tiny, so halving truncates
    return buffer.getvalue()


@pytest.mark.parametrize("name,content,expected", [
    ("truncated.jpg", _valid_bytes("JPEG")[:400], "corrupt or truncated"),
    ("truncated.png", _valid_bytes("PNG")[:2000], "corrupt or truncated"),
    ("empty.jpg", b"", "not an image"),
    ("random.jpg", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
     "not an image"),
    ("notes.png", b"Just some text, saved with the wrong extension.\n" * 20, "not an image"),
], ids=["truncated-jpeg", "truncated-png", "zero-bytes", "random-bytes-jpg", "text-as-png"])
def test_bad_files_raise_decode_error_with_short_message(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(ImageDecodeError) as error:
        load_image(path)

    assert expected in assert_short_message(error)


def test_over_megapixel_cap_is_refused_with_hint(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(path, compress_level=1)

    with pytest.raises(ImageDecodeError) as error:
        load_image(path, max_megapixels=1)

    message = assert_short_message(error)
    assert "3000x3000" in message
    assert "1 MP cap" in message
    assert "`max_megapixels`" in message


def test_under_the_cap_loads(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("L", (1000, 900)).save(path)  # 0.9 MP
    assert load_image(path, max_megapixels=1).size == (1000, 900)


def test_cap_is_checked_before_pixel_data_is_decoded(tmp_path):
    # No valid pixel data at all: decoding first would give "corrupt or truncated" instead.
    path = tmp_path / "big_header_only.png"
    png_header_only(path, 3000, 3000, bit_depth=8, colour_type=0, idat=b"")

    with pytest.raises(ImageDecodeError) as error:
        load_image(path, max_megapixels=1)

    assert "`max_megapixels`" in assert_short_message(error)


def test_decompression_bomb_refused_quickly_with_default_cap(tmp_path):
    # 20000x20000 1-bit PNG of zeros: 400 MP (50 MB of rows) compressed to ~50 KB.
    width = height = 20000
    row = b"\x00" * (1 + width // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(height // 1000)) + compressor.flush()
    path = tmp_path / "bomb.png"
    png_header_only(path, width, height, bit_depth=1, colour_type=0, idat=idat)
    assert path.stat().st_size < 1_000_000
    with Image.open(path) as check:  # a real PNG PIL understands, not just junk
        assert check.size == (width, height)

    start = time.perf_counter()
    with pytest.raises(ImageDecodeError) as error:
        load_image(path)
    elapsed = time.perf_counter() - start

    assert elapsed < 1.0
    message = assert_short_message(error)
    assert "400.0 megapixels" in message and "100 MP cap" in message and "`max_megapixels`" in message


def test_jpeg_draft_decoding_keeps_the_requested_side(tmp_path):
    """Draft mode decodes big JPEGs at a reduced scale, never below min_side."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (90, 140, 200)).save(path, quality=90)
    small = load_image(path, min_side=448)
    assert small.size == (1000, 750)  # 1/2 scale: 1/4 would make the short side 375
    assert load_image(path).size == (2000, 1500)
    png = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500), (90, 140, 200)).save(png)
    assert load_image(png, min_side=448).size == (2000, 1500)  # only JPEG has a draft mode
    assert small.getpixel((500, 300)) == pytest.approx(load_image(path).getpixel((1000, 600)),
                                                       abs=3)
