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
import io
import re
import warnings

from PIL import Image, ImageOps, PngImagePlugin

from mlx_sd_server.job import Job, JobError, Limits

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

_DATA_URL_RE = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def decode_base64_image(text: str, param: str) -> bytes:
    """A base64 string or `data:image/...;base64,` URL (how JSON requests carry images) -> bytes."""
    payload = _DATA_URL_RE.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise JobError(f"{param} must be a base64 image or a data URL", param, "invalid_image") from None


def open_upload(data: bytes, param: str, *, max_bytes: int, max_pixels: int,
                max_aspect: float = Limits.max_upload_aspect) -> Image.Image:
    """Decode an uploaded image, refusing anything too big, not an image, a decompression bomb, or an
    aspect ratio (long side / short side) over `max_aspect`.

    Returns a loaded image in RGB, RGBA or L mode, rotated upright by its EXIF orientation.
    """
    if len(data) > max_bytes:
        raise JobError(f"{param} is {len(data)} bytes, over the limit of {max_bytes}", param, "image_too_large", 413)
    if not data:
        raise JobError(f"{param} is empty", param, "invalid_image")
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; our own bound below is stricter.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise JobError(
                    f"{param} is {width}x{height} pixels, over the limit of {max_pixels}",
                    param, "image_too_large",
                )
            if max(width, height) > max_aspect * min(width, height):
                raise JobError(f"{param} is {width}x{height}: its aspect ratio is over this server's limit of "
                               f"{max_aspect:g}:1", param, "invalid_image_dimensions")
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                return image.convert("RGBA")
            return image.convert("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB")
        except JobError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise JobError(f"{param} decodes to too many pixels", param, "image_too_large") from None
        except MemoryError:
            raise JobError(f"{param} needs more memory to decode than the server has free", param,
                           "image_too_large") from None
        except Exception:  # Pillow raises many types for malformed files; all mean "not an image"
            raise JobError(
                f"{param} is not a readable image (accepted: {', '.join(ACCEPTED_FORMATS)})", param, "invalid_image"
            ) from None


def has_transparency(image: Image.Image) -> bool:
    return image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255


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


def a1111_parameters(job: Job, seed: int, model_name: str) -> str:
    """Generation settings in the AUTOMATIC1111 'parameters' text form that image tools read back."""
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    settings = [
        f"Steps: {job.steps}", f"Sampler: {job.sample_method}", f"Schedule type: {job.scheduler}",
        f"CFG scale: {job.cfg_scale:g}", f"Seed: {seed}", f"Size: {job.width}x{job.height}", f"Model: {model_name}",
    ]
    if job.guidance is not None:
        settings.append(f"Distilled CFG Scale: {job.guidance:g}")  # Forge's name for FLUX's guidance
    if job.init_image is not None:
        settings.append(f"Denoising strength: {job.strength:g}")
    if job.control_image is not None:
        settings.append(f"ControlNet strength: {job.control_strength:g}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def encode_image(image: Image.Image, output_format: str = "png", *, quality: int | None = None,
                 parameters: str | None = None) -> bytes:
    """Encode an output image. PNG carries `parameters` as a text chunk; `quality` applies to jpeg/webp."""
    buffer = io.BytesIO()
    pil_format = OUTPUT_FORMATS[output_format]
    options: dict = {}
    if pil_format == "PNG" and parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)  # tEXt, or iTXt when not Latin-1
        options["pnginfo"] = info
    elif pil_format != "PNG" and quality is not None:
        options["quality"] = quality
    image.convert("RGB").save(buffer, pil_format, **options)
    return buffer.getvalue()
