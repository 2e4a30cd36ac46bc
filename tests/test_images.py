import base64
import io
import time
import zlib
import struct

import pytest
from PIL import Image

from mlx_sd_server.images import (
    a1111_parameters, decode_base64_image, encode_image, flatten, has_transparency,
    mask_from_upload, open_upload,
)
from mlx_sd_server.job import JobError, build_job

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1024 * 1024}


def png_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: how a decompression bomb starts."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    # A tiny compressed stream that would inflate to width*height bytes of zeros.
    compressor = zlib.compressobj()
    row = b"\x00" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def expect_error(data: bytes, code: str, status: int = 400, **limits) -> JobError:
    with pytest.raises(JobError) as caught:
        open_upload(data, "image", **{**LIMITS, **limits})
    assert (caught.value.code, caught.value.status, caught.value.param) == (code, status, "image")
    return caught.value


def test_decodes_png_jpeg_webp_to_rgb():
    source = Image.new("RGB", (40, 30), (10, 200, 30))
    for fmt in ("PNG", "JPEG", "WEBP"):
        buffer = io.BytesIO()
        source.save(buffer, fmt)
        image = open_upload(buffer.getvalue(), "image", **LIMITS)
        assert (image.mode, image.size) == ("RGB", (40, 30))


def test_refuses_too_many_bytes_with_413():
    expect_error(png_bytes(Image.new("RGB", (8, 8))), "image_too_large", 413, max_bytes=10)


@pytest.mark.parametrize("side", [9_000, 100_000])  # under and over Pillow's own bomb threshold
def test_refuses_decompression_bomb_before_decoding(side):
    bomb = png_header_only(side, side)
    assert len(bomb) < 10_000
    expect_error(bomb, "image_too_large")


def test_refuses_image_over_pixel_limit():
    expect_error(png_bytes(Image.new("RGB", (64, 64))), "image_too_large", max_pixels=63 * 64)


@pytest.mark.parametrize("width, height", [(1, 100_000), (100_000, 1), (1, 36_000_000), (2, 41)])
def test_refuses_thin_strips_from_the_header(width, height):
    """A thin strip would be scaled to a giant to cover the output; it is refused before decoding."""
    data = png_header_only(width, height)
    started = time.monotonic()
    error = expect_error(data, "invalid_image_dimensions", max_pixels=36_000_000)
    assert f"{width}x{height}" in error.message and time.monotonic() - started < 0.5


def test_aspect_limit_is_a_parameter():
    assert open_upload(png_bytes(Image.new("RGB", (2, 40))), "image", **LIMITS).size == (2, 40)
    expect_error(png_bytes(Image.new("RGB", (2, 40))), "invalid_image_dimensions", max_aspect=19.9)
    assert open_upload(png_bytes(Image.new("RGB", (1, 50))), "image", **LIMITS, max_aspect=50).size == (1, 50)


def test_sixteen_bit_and_cmyk_images_decode():
    gray16 = Image.new("I;16", (8, 8), 40000)
    assert open_upload(png_bytes(gray16), "image", **LIMITS).mode == "L"
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(buffer, "JPEG")
    assert open_upload(buffer.getvalue(), "image", **LIMITS).mode == "RGB"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_is_an_invalid_image_or_ignored_never_a_crash():
    image = Image.new("RGB", (8, 4))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\xff\xff\xff\xff")
    try:
        assert open_upload(buffer.getvalue(), "image", **LIMITS).size in ((8, 4), (4, 8))
    except JobError as error:
        assert error.code == "invalid_image"


@pytest.mark.parametrize("data", [
    b"not an image at all",
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # a PNG signature and garbage
    b"%PDF-1.4\n1 0 obj",
    b"",
], ids=["text", "corrupt-png", "pdf", "empty"])
def test_refuses_non_images(data):
    expect_error(data, "invalid_image")


def test_refuses_truncated_png():
    data = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    expect_error(data[: len(data) // 2], "invalid_image")


def test_applies_exif_orientation():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    assert open_upload(buffer.getvalue(), "image", **LIMITS).size == (20, 40)


def test_mask_alpha_zero_means_repaint():
    mask = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    mask.putpixel((0, 0), (0, 0, 0, 0))
    out = mask_from_upload(open_upload(png_bytes(mask), "mask", **LIMITS))
    assert out.mode == "L"
    assert out.getpixel((0, 0)) == 255 and out.getpixel((1, 0)) == 0


def test_mask_without_alpha_white_means_repaint():
    mask = Image.new("RGB", (4, 2), (0, 0, 0))
    mask.putpixel((3, 1), (255, 255, 255))
    out = mask_from_upload(open_upload(png_bytes(mask), "mask", **LIMITS))
    assert out.getpixel((3, 1)) == 255 and out.getpixel((0, 0)) == 0


def test_opaque_rgba_mask_is_read_by_brightness():
    mask = Image.new("RGBA", (2, 1), (0, 0, 0, 255))
    mask.putpixel((1, 0), (255, 255, 255, 255))
    out = mask_from_upload(open_upload(png_bytes(mask), "mask", **LIMITS))
    assert [out.getpixel((x, 0)) for x in range(2)] == [0, 255]


def test_palette_transparency_counts_as_alpha():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 255, 255])
    image.putpixel((1, 0), 1)
    decoded = open_upload(png_bytes(image, transparency=1), "image", **LIMITS)
    assert has_transparency(decoded)
    assert mask_from_upload(decoded).getpixel((1, 0)) == 255


def test_flatten_paints_transparent_areas_black():
    flat = flatten(Image.new("RGBA", (10, 5), (255, 255, 255, 0)))
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (0, 0, 0)


def test_base64_and_data_url():
    data = png_bytes(Image.new("RGB", (2, 2)))
    text = base64.b64encode(data).decode()
    assert decode_base64_image(text, "image") == data
    assert decode_base64_image("data:image/png;base64," + text, "image") == data
    with pytest.raises(JobError) as caught:
        decode_base64_image("not base64!!", "control_image")
    assert caught.value.param == "control_image"


def test_png_carries_a1111_parameters():
    job = build_job({"prompt": "a cat", "negative_prompt": "dogs", "steps": 4, "size": "64x64", "seed": 7})
    text = a1111_parameters(job, 7, "tiny")
    assert text == ("a cat\nNegative prompt: dogs\nSteps: 4, Sampler: Euler a, Schedule type: Uniform, "
                    "CFG scale: 7, Seed: 7, Size: 64x64, Model: tiny")
    data = encode_image(Image.new("RGB", (64, 64)), "png", parameters=text)
    assert Image.open(io.BytesIO(data)).info["parameters"] == text
    unicode = a1111_parameters(build_job({"prompt": "猫", "size": "64x64"}), 1, "m")
    assert Image.open(io.BytesIO(encode_image(Image.new("RGB", (8, 8)), parameters=unicode))).info["parameters"] == unicode


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_encodes_jpeg_and_webp_with_quality(fmt):
    noise = Image.effect_noise((64, 64), 80).convert("RGB")
    small, large = (encode_image(noise, fmt, quality=q) for q in (10, 95))
    assert Image.open(io.BytesIO(small)).format == fmt.upper()
    assert len(small) < len(large)
