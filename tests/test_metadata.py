"""Generation metadata as AUTOMATIC1111 reads it back: its infotext parser, re-implemented here from its
`modules/infotext_utils.py` (`parse_generation_parameters`, `unquote`), applied to what our PNG, JPEG and
WebP files carry; the JPEG/WebP EXIF UserComment decoded as A1111 does (piexif's UserComment.load)."""

import io
import json
import re

import pytest
from PIL import Image

from mlx_sd_server.images import (
    A1111_SAMPLERS, A1111_SCHEDULES, EXIF_IFD, USER_COMMENT, a1111_parameters, encode_image, model_hash,
)
from mlx_sd_server.engine.sampling.samplers import SAMPLE_METHODS
from mlx_sd_server.engine.sampling.schedules import SCHEDULERS
from mlx_sd_server.job import Capabilities, build_job

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x):
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in RE_PARAM.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    return res


def user_comment_load(data: bytes) -> str:
    """piexif.helper.UserComment.load, which A1111 uses on JPEG/WebP."""
    prefix, body = data[:8], data[8:]
    encoding = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", b"UNICODE\0": "utf_16_be"}[prefix]
    return body.decode(encoding)


def read_back(data: bytes) -> str:
    """Where A1111's read_info_from_image finds the text: PNG info, else the EXIF UserComment."""
    image = Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return image.info["parameters"]
    return user_comment_load(image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT])


SD_FIELDS = {"prompt": "a red fox, snow\n(masterpiece)", "negative_prompt": "blurry, lowres", "steps": 12,
             "cfg_scale": 6.5, "sample_method": "dpm++2m", "scheduler": "karras", "size": "64x96", "seed": 1234}


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_a1111_reads_back_every_setting(fmt):
    job = build_job(SD_FIELDS)
    text = a1111_parameters(job, 1234, "sd-turbo, v2: q8", model_hash="0123456789")
    data = encode_image(Image.new("RGB", (64, 96)), fmt, quality=90, parameters=text)
    assert read_back(data) == text
    res = parse_generation_parameters(read_back(data))
    assert res["Prompt"] == "a red fox, snow\n(masterpiece)"
    assert res["Negative prompt"] == "blurry, lowres"
    assert res["Steps"] == "12"
    assert res["Sampler"] == "DPM++ 2M"
    assert res["Schedule type"] == "Karras"
    assert res["CFG scale"] == "6.5"
    assert res["Seed"] == "1234"
    assert (res["Size-1"], res["Size-2"]) == ("64", "96")
    assert res["Model"] == "sd-turbo, v2: q8"  # quoted as A1111 quotes: it has a comma and a colon
    assert res["Model hash"] == "0123456789"


def test_flux_distilled_guidance_reads_back():
    caps = Capabilities("flux", guidance=True, inpainting=False, controlnet=False, size_multiple=16)
    job = build_job({"prompt": "a lighthouse", "guidance": 3.5, "cfg_scale": 1, "size": "64x64", "seed": 9},
                    capabilities=caps)
    res = parse_generation_parameters(read_back(encode_image(Image.new("RGB", (64, 64)), "webp",
                                                             parameters=a1111_parameters(job, 9, "flux1-schnell"))))
    assert res["Distilled CFG Scale"] == "3.5"
    assert res["CFG scale"] == "1" and res["Model"] == "flux1-schnell" and res["Negative prompt"] == ""
    assert "Model hash" not in res


def test_every_sampler_and_schedule_has_an_a1111_name():
    assert set(A1111_SAMPLERS) == set(SAMPLE_METHODS)
    assert set(A1111_SCHEDULES) <= set(SCHEDULERS)
    assert set(SCHEDULERS) - set(A1111_SCHEDULES) <= {"gits"}  # refused by build_job: never written
    a1111_samplers = {"Euler a", "Euler", "Heun", "DPM2", "DPM++ 2S a", "DPM++ 2M", "LCM"}
    assert a1111_samplers <= set(A1111_SAMPLERS.values())
    for ours in ("euler_a", "heun", "dpm++2s_a", "lcm"):
        job = build_job({"prompt": "x", "size": "64x64", "sample_method": ours, "scheduler": "ays"})
        res = parse_generation_parameters(a1111_parameters(job, 1, "m"))
        assert res["Sampler"] == A1111_SAMPLERS[ours] and res["Schedule type"] == "Align Your Steps"


def test_exif_user_comment_is_what_piexif_writes():
    text = "猫, a cat\nSteps: 4, Sampler: Euler a, Seed: 1"
    image = Image.open(io.BytesIO(encode_image(Image.new("RGB", (8, 8)), "jpeg", parameters=text)))
    raw = image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
    assert raw == b"UNICODE\0" + text.encode("utf_16_be")  # piexif.helper.UserComment.dump(text, "unicode")
    assert "exif" in image.info and image.info["exif"].startswith(b"Exif\0\0")


def test_no_parameters_no_exif():
    assert "exif" not in Image.open(io.BytesIO(encode_image(Image.new("RGB", (8, 8)), "jpeg"))).info


def test_model_hash_of_a_converted_folder(tmp_path):
    assert model_hash(tmp_path) is None
    (tmp_path / "model.json").write_text('{"family": "sd1", "components": {}}')
    first = model_hash(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{10}", first)
    import hashlib
    assert first == hashlib.sha256((tmp_path / "model.json").read_bytes()).hexdigest()[:10]
    (tmp_path / "model.json").write_text('{"family": "sd1", "components": {}, "source_sha256": "'
                                         + "ABCDEF0123" + "4" * 54 + '"}')
    assert model_hash(tmp_path) == "abcdef0123"


def _exif_entries(exif: bytes):
    """(tag, type, count) of IFD0 and of the Exif IFD it points to, read straight from the TIFF bytes."""
    import struct
    tiff = exif.removeprefix(b"Exif\0\0")  # Pillow keeps it for JPEG, drops it for WebP
    order = "<" if tiff[:2] == b"II" else ">"

    def entries(offset):
        count = struct.unpack(order + "H", tiff[offset:offset + 2])[0]
        return [struct.unpack(order + "HHII", tiff[offset + 2 + 12 * i:offset + 14 + 12 * i]) for i in range(count)]

    ifd0 = entries(struct.unpack(order + "I", tiff[4:8])[0])
    pointer = next(value for tag, _, _, value in ifd0 if tag == EXIF_IFD)
    return ifd0, entries(pointer)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_user_comment_has_exifs_undefined_type(fmt):
    """piexif (A1111's reader) returns a BYTE-typed tag as a tuple of ints, which UserComment.load cannot
    decode: the comment must be UNDEFINED (7), as EXIF specifies."""
    data = encode_image(Image.new("RGB", (8, 8)), fmt, parameters="abc")
    _, exif_ifd = _exif_entries(Image.open(io.BytesIO(data)).info["exif"])
    assert [(tag, typ, count) for tag, typ, count, _ in exif_ifd] == [(USER_COMMENT, 7, 8 + 6)]


def test_model_hash_of_a_single_file_conversion_is_a1111s(tmp_path):
    """A converted single-file checkpoint records its sha256; the images' Model hash is its first 10 hex
    digits, as A1111 shortens the hash of the same file."""
    import hashlib

    import tiny_diffusers
    from convert.model import convert_model
    from safetensors.numpy import save_file

    from ldm_layout import checkpoint_state, with_clip_vocabulary
    from mlx_sd_server.images import model_hash

    pipe = tiny_diffusers.make_pipeline(tmp_path / "src", "sd1")
    checkpoint = tmp_path / "tiny.safetensors"  # its CLIP with the rows of CLIP's tokenizer, which conversion gives it
    save_file(with_clip_vocabulary(checkpoint_state(pipe, "sd1")), str(checkpoint))
    folder = convert_model(checkpoint, tmp_path / "models" / "tiny", dtype="float32", progress=False)
    assert model_hash(folder) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
