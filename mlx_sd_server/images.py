"""Images in and out of the server: decoding untrusted uploads safely, and encoding results.

Uploads are bounded in bytes before Pillow sees them, and in pixels and aspect ratio after Pillow has read
only the header, so a small file that decodes to a huge canvas (a decompression bomb) or to a thin strip
(which the pipeline would scale to a giant to cover the output) is refused before any pixel memory is
allocated. Only real raster images in a few formats are accepted; whatever Pillow makes of a malformed one,
the client gets a 400. (`build_job` checks the decoded images against the output size.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from PIL import Image, ImageOps, PngImagePlugin

from mlx_sd_server.job import Job, JobError, Limits

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

_DATA_URL_RE = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def decode_base64_image(text: str, param: str, label: str | None = None) -> bytes:
    """A base64 string or `data:image/...;base64,` URL (how JSON requests carry images) -> bytes. `label`
    names it in messages (`image 2`)."""
    payload = _DATA_URL_RE.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise JobError(f"{label or param} must be a base64 image or a data URL", param, "invalid_image") from None


# An upload is kept in memory up to this size, in a temporary file beyond (until it is decoded).
SPOOL_BYTES = 1 << 20
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_DATA_URL_BYTES = re.compile(rb"data:image/[A-Za-z0-9_.+-]+;base64,", re.IGNORECASE)
_BASE64_SLICE = 4 * 64 * 1024  # characters decoded at a time (a multiple of 4)


def spooled_upload() -> IO[bytes]:
    """Where an upload is kept while it arrives: memory up to SPOOL_BYTES, then an unnamed temporary file."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)


def decode_base64_upload(
    data: bytes | bytearray | memoryview,
    param: str,
    *,
    max_pixels: int,
    max_aspect: float = Limits.max_upload_aspect,
    label: str | None = None,
) -> IO[bytes]:
    """A base64 image or data URL held as bytes (a long JSON string, set aside unread) -> a spooled file of
    the image's bytes, as decode_base64_image would decode it, but a slice at a time and without copying
    the text: its first slice is judged (check_upload_head) before the rest is decoded."""
    view = memoryview(data)
    start, end = 0, len(view)
    while start < end and view[start] in b" \t\n\r\x0b\x0c":
        start += 1
    while end > start and view[end - 1] in b" \t\n\r\x0b\x0c":
        end -= 1
    prefix = _DATA_URL_BYTES.match(view, start, end)
    payload = view[prefix.end() if prefix else start : end]
    invalid = JobError(f"{label or param} must be a base64 image or a data URL", param, "invalid_image")
    if _BASE64.fullmatch(payload) is None:
        raise invalid
    out = spooled_upload()
    try:
        for at in range(0, len(payload), _BASE64_SLICE):
            piece = binascii.a2b_base64(payload[at : at + _BASE64_SLICE])
            if at == 0:
                check_upload_head(
                    piece[:HEADER_BYTES], param, max_pixels=max_pixels, max_aspect=max_aspect, label=label
                )
            out.write(piece)
    except binascii.Error:
        out.close()
        raise invalid from None
    except BaseException:
        out.close()
        raise
    return out


# How many of an upload's first bytes tell its format (what Image.open reads to choose a decoder), and how
# many are read for a lazy open's header (width, height) while an upload is still arriving.
SIGNATURE_BYTES = 16
HEADER_BYTES = 64 * 1024


def _not_an_image(param: str, label: str) -> JobError:
    return JobError(
        f"{label} is not a readable image (accepted: {', '.join(ACCEPTED_FORMATS)})", param, "invalid_image"
    )


def _check_dimensions(width: int, height: int, param: str, label: str, max_pixels: int, max_aspect: float) -> None:
    if width * height > max_pixels:
        raise JobError(f"{label} is {width}x{height} pixels, over the limit of {max_pixels}", param, "image_too_large")
    if max(width, height) > max_aspect * min(width, height):
        raise JobError(
            f"{label} is {width}x{height}: its aspect ratio is over this server's limit of {max_aspect:g}:1",
            param,
            "invalid_image_dimensions",
        )


@dataclass
class PixelBudget:
    """The decoded pixels a request's uploads may take together (each is bounded on its own too): a request
    of several images costs at most what one of image, mask and control image did."""

    total: int
    used: int = 0

    def take(self, width: int, height: int, param: str, label: str) -> None:
        if self.used + width * height > self.total:
            raise JobError(
                f"{label} ({width}x{height}) takes the request's images over this server's limit of "
                f"{self.total} decoded pixels in all; send fewer or smaller images",
                param,
                "image_too_large",
            )
        self.used += width * height


def check_upload_head(
    head: bytes | bytearray,
    param: str,
    *,
    max_pixels: int,
    max_aspect: float = Limits.max_upload_aspect,
    label: str | None = None,
) -> None:
    """Judge an upload by its first bytes while the rest is still arriving, so a refused one is never
    kept whole: from SIGNATURE_BYTES on, it must start as one of ACCEPTED_FORMATS does (Pillow's own test,
    as Image.open makes it); from HEADER_BYTES on, a header Pillow can read (most formats' fits in the
    first bytes; a JPEG behind large metadata may not, and is judged whole by open_upload) must give a
    size within the limits. Fewer bytes than SIGNATURE_BYTES: nothing to judge yet. `label` names the
    upload in messages (`image 2`), `param` is its field."""
    label = label or param
    if len(head) < SIGNATURE_BYTES:
        return
    Image.init()
    prefix = bytes(head[:SIGNATURE_BYTES])
    accepts = [Image.OPEN[name][1] for name in ACCEPTED_FORMATS if name in Image.OPEN]
    if not any(accept is None or accept(prefix) for accept in accepts):
        raise _not_an_image(param, label)
    if len(head) < HEADER_BYTES:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(bytes(head)), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size  # the header only
        except Exception:  # a header beyond these bytes, or a malformed one: open_upload decides
            return
    _check_dimensions(width, height, param, label, max_pixels, max_aspect)


def open_upload(
    data: bytes | IO[bytes],
    param: str,
    *,
    max_bytes: int,
    max_pixels: int,
    max_aspect: float = Limits.max_upload_aspect,
    budget: PixelBudget | None = None,
    label: str | None = None,
) -> Image.Image:
    """Decode an uploaded image (its bytes, or a seekable binary file holding them), refusing anything too
    big, not an image, a decompression bomb, an aspect ratio (long side / short side) over `max_aspect`, or
    more pixels than are left of the request's `budget`. `label` names it in messages (`image 2`).

    Returns a loaded image in RGB, RGBA or L mode, rotated upright by its EXIF orientation.
    """
    label = label or param
    stream: IO[bytes]
    if isinstance(data, (bytes, bytearray, memoryview)):
        size, stream = len(data), io.BytesIO(data)
    else:
        stream = data
        size = stream.seek(0, os.SEEK_END)
        stream.seek(0)
    if size > max_bytes:
        raise JobError(f"{label} is {size} bytes, over the limit of {max_bytes}", param, "image_too_large", 413)
    if not size:
        raise JobError(f"{label} is empty", param, "invalid_image")
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; our own bound below is stricter.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream, formats=ACCEPTED_FORMATS)
            width, height = image.size  # from the header: nothing decoded yet
            _check_dimensions(width, height, param, label, max_pixels, max_aspect)
            if budget is not None:
                budget.take(width, height, param, label)
            image.load()
            upright = ImageOps.exif_transpose(image)
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                return upright.convert("RGBA")
            return upright.convert("L" if upright.mode in ("1", "L", "I", "I;16", "F") else "RGB")
        except JobError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise JobError(f"{label} decodes to too many pixels", param, "image_too_large") from None
        except MemoryError:
            raise JobError(
                f"{label} needs more memory to decode than the server has free", param, "image_too_large"
            ) from None
        except Exception:  # Pillow raises many types for malformed files; all mean "not an image"
            raise _not_an_image(param, label) from None


INPUT_HASH_DIGITS = 10  # as A1111's short model hash


def short_sha256(data: bytes | IO[bytes]) -> str:
    """The first INPUT_HASH_DIGITS hex digits of the sha256 of an upload's bytes (or of a seekable file holding
    them, read from its start): what `sha256sum` of the client's file starts with, for the metadata."""
    digest = hashlib.sha256()
    if isinstance(data, (bytes, bytearray, memoryview)):
        digest.update(data)
    else:
        data.seek(0)
        while chunk := data.read(1 << 20):
            digest.update(chunk)
        data.seek(0)
    return digest.hexdigest()[:INPUT_HASH_DIGITS]


def has_transparency(image: Image.Image) -> bool:
    if image.mode != "RGBA":
        return False
    # PIL types getextrema for any number of bands; one band gives its (min, max)
    lowest, _ = cast("tuple[int, int]", image.getchannel("A").getextrema())
    return lowest < 255


def mask_from_upload(image: Image.Image) -> Image.Image:
    """An uploaded mask -> the job's mask: mode L, 255 = repaint.

    OpenAI's convention: transparent pixels (alpha 0) mark the area to repaint. A mask with no
    transparency (no alpha channel, or an opaque one) is read by brightness: white = repaint.
    """
    if has_transparency(image):
        return ImageOps.invert(image.getchannel("A"))
    return image.convert("L")


def flatten(image: Image.Image) -> Image.Image:
    """RGB for the engine; transparent areas become black rather than whatever colour they hid."""
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


# AUTOMATIC1111's display names (its infotext "Sampler:" and "Schedule type:" values), so that its PNG Info tab
# and tools that read its format (Civitai, image browsers) recognize our settings. dpm++2mv2 is
# stable-diffusion.cpp's variant of DPM++ 2M (a different step-size ratio for the second-order correction);
# A1111 has no such sampler, and "DPM++ 2M" is the closest. iPNDM and LCM scheduling have no A1111
# counterpart: they keep a readable name of their own, which A1111 ignores (falling back to its default).
A1111_SAMPLERS = {
    "euler_a": "Euler a",
    "euler": "Euler",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpm++2s_a": "DPM++ 2S a",
    "dpm++2m": "DPM++ 2M",
    "dpm++2mv2": "DPM++ 2M",
    "ipndm": "iPNDM",
    "ipndm_v": "iPNDM_V",
    "lcm": "LCM",
}
# "discrete" is the model's own timestep spacing: A1111's "Uniform" (k-diffusion's get_sigmas), not its
# "Automatic", which means "the sampler's default" and is Karras for some of its samplers.
A1111_SCHEDULES = {
    "discrete": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "ays": "Align Your Steps",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "trailing": "Trailing",
    "lcm": "LCM",
}

# hr_upscaler -> A1111's name for it ("Hires upscaler"); an upscaler file keeps its own name, as in A1111
A1111_UPSCALERS = {
    "latent": "Latent",
    "latent-bicubic": "Latent (bicubic)",
    "latent-nearest": "Latent (nearest)",
    "latent-nearest-exact": "Latent (nearest-exact)",
    "lanczos": "Lanczos",
    "nearest": "Nearest",
}

_hash_cache: dict[tuple[str, int, int], str] = {}


def model_hash(folder: str | os.PathLike) -> str | None:
    """The 'Model hash' of a converted model folder: 10 hex digits, the length of A1111's short hash.

    A1111's is the start of the sha256 of the checkpoint file. A converted folder has no such single file,
    so this is the source checkpoint's hash when the converter recorded one in the manifest
    (`source_sha256`), else the start of the sha256 of the manifest itself (`model.json`: the components'
    configs and weight file names): it then identifies this conversion, not the original checkpoint.
    None when the folder has no manifest.
    """
    path = Path(folder) / "model.json"
    try:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in _hash_cache:
            data = path.read_bytes()
            try:
                source = json.loads(data).get("source_sha256")
            except (ValueError, AttributeError):
                source = None
            if isinstance(source, str) and re.fullmatch(r"[0-9a-fA-F]{10,64}", source):
                _hash_cache[key] = source[:10].lower()
            else:
                _hash_cache[key] = hashlib.sha256(data).hexdigest()[:10]
        return _hash_cache[key]
    except OSError:
        return None


def _a1111_quote(value: str) -> str:
    """A1111's `quote`: a value with a comma, colon or newline is written as a JSON string."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def a1111_parameters(
    job: Job, seed: int, model_name: str, *, model_hash: str | None = None, lora_hashes: dict[str, str] | None = None
) -> str:
    """Generation settings in the AUTOMATIC1111 'parameters' text form that image tools read back.

    The prompt, a "Negative prompt: " line, and one line of "Key: value" settings, as A1111 writes them
    (its `parse_generation_parameters` reads this back; tests/test_metadata.py applies its rules). The job's
    LoRAs, wherever the request gave them, are `<lora:name:weight>` tags at the end of the prompt (pasting
    the text back applies them) and `Lora hashes` (A1111's: the first 12 hex digits of each file's sha256).
    An edit's uploaded inputs are `Input hashes` (ours: `image: <short_sha256>`, numbered `image 1`,
    `image 2`... when there are several, then `mask`, `control_image`), so a result can be traced back.
    """
    lines = [job.prompt + "".join(f" <lora:{name}:{weight:g}>" for name, weight in job.loras)]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    settings = [
        f"Steps: {job.steps}",
        f"Sampler: {A1111_SAMPLERS.get(job.sample_method, job.sample_method)}",
        f"Schedule type: {A1111_SCHEDULES.get(job.scheduler, job.scheduler)}",
        f"CFG scale: {job.cfg_scale:g}",
        f"Seed: {seed}",
        f"Size: {job.width}x{job.height}",
    ]
    if model_hash:
        settings.append(f"Model hash: {model_hash}")
    settings.append(f"Model: {_a1111_quote(model_name)}")
    if job.guidance is not None:
        settings.append(f"Distilled CFG Scale: {job.guidance:g}")  # Forge's name for FLUX's guidance
    if job.init_image is not None:
        settings.append(f"Denoising strength: {job.strength:g}")
    if job.hr_scale is not None:  # as A1111 writes a hires fix (Size stays the first pass's)
        settings.append(f"Denoising strength: {job.hr_strength:g}")
        settings.append(f"Hires upscale: {job.hr_scale:g}")
        if job.hr_steps:
            settings.append(f"Hires steps: {job.hr_steps}")
        settings.append(f"Hires upscaler: {_a1111_quote(A1111_UPSCALERS.get(job.hr_upscaler, job.hr_upscaler))}")
        for name, text, base in (
            ("Hires prompt", job.hr_prompt, job.prompt),
            ("Hires negative prompt", job.hr_negative_prompt, job.negative_prompt),
        ):
            if text is not None and text != base:
                settings.append(f"{name}: {_a1111_quote(text)}")
    if job.control_image is not None:
        settings.append(f"ControlNet strength: {job.control_strength:g}")
    if job.loras and lora_hashes:
        settings.append(
            "Lora hashes: " + _a1111_quote(", ".join(f"{name}: {lora_hashes[name]}" for name, _ in job.loras))
        )
    if job.input_hashes:
        settings.append("Input hashes: " + _a1111_quote(", ".join(input_labels(job.input_hashes))))
    lines.append(", ".join(settings))
    return "\n".join(lines)


def input_labels(hashes: tuple[tuple[str, str], ...]) -> list[str]:
    """(field, hash) pairs -> `field: hash`, a field given several times numbered from 1 (`image 2: ...`)."""
    counts = {name: sum(1 for other, _ in hashes if other == name) for name, _ in hashes}
    seen: dict[str, int] = {}
    labels = []
    for name, digest in hashes:
        seen[name] = seen.get(name, 0) + 1
        labels.append(f"{name} {seen[name]}: {digest}" if counts[name] > 1 else f"{name}: {digest}")
    return labels


# EXIF UserComment (tag 0x9286 in the Exif IFD 0x8769), as A1111 writes it with piexif for JPEG and WebP:
# an 8-byte character-code prefix, then the text in UTF-16 big-endian.
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\0"


def user_comment_exif(text: str) -> bytes:
    """EXIF with only a UserComment, laid out as piexif.dump lays it out (big-endian TIFF: IFD0 holding
    the pointer to the Exif IFD, which holds the comment as type UNDEFINED, as the EXIF standard and
    piexif's reader expect; Pillow's own Exif writer would type it BYTE)."""
    comment = UNICODE_PREFIX + text.encode("utf_16_be")
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", EXIF_IFD, 4, 1, 8 + 18) + struct.pack(">I", 0)
    exif_ifd = struct.pack(">H", 1) + struct.pack(">HHII", USER_COMMENT, 7, len(comment), 8 + 18 + 18)
    exif_ifd += struct.pack(">I", 0)
    return b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + ifd0 + exif_ifd + comment


def encode_image(
    image: Image.Image, output_format: str = "png", *, quality: int | None = None, parameters: str | None = None
) -> bytes:
    """Encode an output image; `quality` applies to jpeg/webp.

    `parameters` goes where A1111 puts it: a PNG `parameters` text chunk, or the EXIF UserComment of a JPEG
    or WebP (UTF-16BE with the "UNICODE\\0" prefix).
    """
    buffer = io.BytesIO()
    pil_format = OUTPUT_FORMATS[output_format]
    options: dict = {}
    if pil_format == "PNG" and parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)  # tEXt, or iTXt when not Latin-1
        options["pnginfo"] = info
    elif pil_format != "PNG":
        if quality is not None:
            options["quality"] = quality
        if parameters is not None:
            options["exif"] = user_comment_exif(parameters)
    image.convert("RGB").save(buffer, pil_format, **options)
    return buffer.getvalue()
