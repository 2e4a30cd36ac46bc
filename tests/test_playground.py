"""The playground page at `/`: served by the app, self-contained (no other host), public even with an API
key, and working end to end in a real headless Chromium against a live server with the tiny model."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from api_server import live_server, multipart, request, tiny_registry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.api.images import VARIATION_INSTRUCTION
from mlx_sd_server.store import FileStore

CHROMIUM = "/usr/bin/chromium"
KEY = "secret-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live server with the tiny model (sd1), an sd1 and an sdxl LoRA, and an API key."""
    import lora_files
    import tiny_diffusers

    loras = tmp_path_factory.mktemp("loras")
    lora_files.write_lora(loras / "detail.safetensors", "kohya", {"unet": tiny_diffusers.unet("sd1")})
    lora_files.write_lora(loras / "xl-style.safetensors", "peft", {"unet": tiny_diffusers.unet("sdxl")})
    app = create_app(tiny_registry(tmp_path_factory.mktemp("models"), lora_dir=loras),
                     FileStore(tmp_path_factory.mktemp("files")), Settings(api_key=KEY))
    with live_server(app) as url:
        yield url


def linked_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href|action)\s*=\s*["']([^"']*)["']""", html, flags=re.IGNORECASE)


def test_page_is_served_without_the_key(server):
    reply = request(server, "GET", "/")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/html")
    html = reply.body.decode()
    assert "<title>mlx-sd-server playground</title>" in html
    for url in linked_urls(html):  # relative, same-origin urls only: no CDN, no other host
        assert not re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", url, flags=re.IGNORECASE), url
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    for asset, kind in (("/playground/playground.js", "text/javascript"), ("/playground/playground.css", "text/css")):
        reply = request(server, "GET", asset)
        assert reply.status == 200 and reply.headers["content-type"].startswith(kind)
        text = reply.body.decode()
        assert not re.search(r"https?://", text), f"{asset} names another host"
        assert "import(" not in text and "@import" not in text


def test_the_page_calls_the_api_same_origin_with_the_key(server):
    script = request(server, "GET", "/playground/playground.js").body.decode()
    for url in re.findall(r"""fetch\(\s*["'`]([^"'`]*)""", script):
        assert url.startswith("v1/"), url  # relative: the page's own origin (and any path prefix)
    assert '"Bearer "' in script and "localStorage" in script
    assert "getReader()" in script and "partial_images" in script
    # the API itself still needs the key
    assert request(server, "GET", "/v1/models").status == 401
    assert request(server, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status == 200


def test_no_other_file_is_served(server):
    for path in ("/playground/", "/playground/../api/auth.py", "/playground/playground.py", "/static/playground.js",
                 "/playground/playground.html.bak"):
        assert request(server, "GET", path).status == 404, path


# --- in a browser ----------------------------------------------------------------------------------------


def chromium() -> str:
    """Debian's chromium, installed here if missing and we may (root with apt); else the test is skipped."""
    if not os.path.exists(CHROMIUM) and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True, timeout=600)
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM} (Debian's chromium package; install it, as root: apt-get install chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package (the test extra)")
    executable = chromium()
    # Without ./run-tests' LD_PRELOAD (OpenBLAS is for MLX, not for the browser), and a generous start-up
    # timeout: a loaded 2-core machine can take a while to start chromium.
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, env=env, timeout=120_000, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Where the screenshot goes: $MLX_SD_TEST_ARTIFACTS, else pytest's temporary folder (never the checkout)."""
    folder = Path(os.environ["MLX_SD_TEST_ARTIFACTS"]) if os.environ.get("MLX_SD_TEST_ARTIFACTS") else \
        tmp_path_factory.getbasetemp() / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_playground(browser, server: str, errors: list[str], on_request=None):
    """The page, with the API key entered (stored, the models reloaded with it); page errors go to `errors`,
    and every request from the first on to `on_request`."""
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.on("pageerror", lambda error: errors.append(str(error)))
    if on_request is not None:
        page.on("request", on_request)
    page.goto(server + "/")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#model option", state="attached", timeout=20_000)
    return page


def generate_and_wait(page, prompt: str, partials: int) -> None:
    """Fill the form (64x64, 2 steps), press Generate, wait until the stream has ended without an error."""
    page.fill("#prompt", prompt)
    page.fill("#size", "64x64")
    page.fill("#steps", "2")
    page.fill("#partials", str(partials))
    page.click("#generate")
    # (locator waits: the page's Content-Security-Policy forbids the eval that wait_for_function uses)
    page.wait_for_selector("#results img.result-image, #status.error", timeout=45_000)
    assert page.locator("#status.error").count() == 0, page.inner_text("#status")
    page.wait_for_selector("#generate:not([disabled])", timeout=10_000)  # the stream has ended


def test_generate_in_the_browser(server, browser, artifacts):
    errors, outside = [], []
    started = time.monotonic()
    page = open_playground(browser, server, errors, on_request=lambda r: None if r.url.startswith(
        (server, "data:", "blob:")) else outside.append(r.url))
    assert page.evaluate("localStorage.getItem('mlx-sd-server.api-key')") == KEY
    page.fill("#seed", "7")
    generate_and_wait(page, "a lovely cat", partials=1)
    size = page.evaluate("[...document.querySelectorAll('#results img.result-image')].map(i => [i.naturalWidth, i.naturalHeight])")
    assert size == [[64, 64]]
    settings = page.inner_text("#results pre")
    assert "prompt: a lovely cat" in settings and "seed: 7" in settings and "steps: 2" in settings
    assert page.inner_text("#status").startswith("done: 1 image")
    assert page.locator("#partials-view img").count() == 1  # the partial image, streamed before the result
    screenshot = artifacts / "playground.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    assert Image.open(screenshot).size[0] >= 1100
    assert errors == [] and outside == []
    assert time.monotonic() - started < 60
    page.close()


def test_edit_with_a_painted_mask_in_the_browser(server, browser, tmp_path):
    source = tmp_path / "source.png"
    Image.new("RGB", (64, 64), (30, 160, 220)).save(source)
    errors, posts = [], []
    page = open_playground(browser, server, errors, on_request=lambda r: posts.append(
        (r.url, r.headers.get("content-type", ""), r.post_data_buffer)) if r.method == "POST" else None)
    page.set_input_files("#image", str(source))
    page.wait_for_selector("#painter:not([hidden])", timeout=10_000)
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    generate_and_wait(page, "a red ball", partials=0)
    assert page.evaluate("[...document.querySelectorAll('#results img.result-image')].map(i => i.naturalWidth)") == [64]
    (url, content_type, _), = [post for post in posts if "/v1/images/" in post[0]]
    assert url == server + "/v1/images/edits" and content_type.startswith("multipart/form-data")
    # the mask the page sent (Chromium does not hand multipart bodies with files to the driver): rebuilt
    mask = bytes(page.evaluate("async () => [...new Uint8Array(await (await maskBlob()).arrayBuffer())]"))
    mask = Image.open(io.BytesIO(mask))
    assert mask.format == "PNG" and mask.size == (64, 64)
    gray = mask.convert("L")
    assert gray.getpixel((10, 32)) == 255 and gray.getpixel((60, 5)) == 0  # painted: repaint; elsewhere: keep
    assert errors == []
    page.close()


def test_several_images_dropped_for_an_instruction_edit_model(browser, tmp_path):
    """Files dropped on the edit box are the inputs, in order, sent as `image[]` parts; a model that edits by
    instruction and takes no mask gets no mask painter and no strength (which it would refuse)."""
    import dataclasses

    from api_server import FakeRegistry
    from mlx_sd_server.job import Capabilities

    class Klein(FakeRegistry):
        def info(self, name=None):
            return dataclasses.replace(super().info(name), family="flux2", capabilities=Capabilities(
                "flux2", img2img=False, inpainting=False, controlnet=False, size_multiple=16, references=4))

        resolve = info

    engine = Klein()
    sizes = [(64, 48), (32, 32), (48, 64)]
    files = []
    for size in sizes:
        buffer = io.BytesIO()
        Image.new("RGB", size, (40, 90, 200)).save(buffer, "PNG")
        files.append(base64.b64encode(buffer.getvalue()).decode())
    with live_server(create_app(engine, FileStore(tmp_path / "files"), Settings(api_key=KEY))) as url:
        errors = []
        page = open_playground(browser, url, errors)
        page.wait_for_selector("#model option[data-references='4']", state="attached", timeout=20_000)
        transfer = page.evaluate_handle("""(files) => {
            const transfer = new DataTransfer();
            files.forEach((b64, i) => transfer.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))],
                                                                  "in" + i + ".png", {type: "image/png"})));
            return transfer;
        }""", files)
        page.dispatch_event("#edit", "drop", {"dataTransfer": transfer})
        assert page.locator("#inputs img").count() == 3
        assert page.is_hidden("#painter") and page.is_hidden("#strength-label") and page.is_hidden("#brush-label")
        assert "Instruction edit" in page.inner_text("#inputs-hint") and "up to 4" in page.inner_text("#inputs-hint")
        generate_and_wait(page, "the three together", partials=0)
        assert [image.size for image in engine.pipeline_.jobs[-1].reference_images] == sizes
        page.click("#inputs li:nth-child(2) button")  # remove the second
        generate_and_wait(page, "the two together", partials=0)
        assert [image.size for image in engine.pipeline_.jobs[-1].reference_images] == [sizes[0], sizes[2]]
        # a variation of the newest result: that one image, with the server's instruction (no prompt sent)
        page.click("#results .result:first-child button.variation")
        page.wait_for_selector("#results .result:nth-child(3)", timeout=20_000)
        page.wait_for_selector("#generate:not([disabled])", timeout=10_000)
        job = engine.pipeline_.jobs[-1]
        assert job.prompt == VARIATION_INSTRUCTION and len(job.reference_images) == 1
        assert job.reference_images[0].size == (64, 64) and "variation_of: " in page.inner_text("#results pre")
        assert errors == []
        page.close()


def test_a_variation_of_a_result_and_the_loaded_model_in_the_browser(server, browser):
    """The picker says which models are in memory, refreshed after each job; "Variation" on a result sends
    that image to /v1/images/variations with the form's settings: the very image the API makes of it."""
    auth = {"Authorization": f"Bearer {KEY}"}
    model = request(server, "GET", "/v1/models", headers=auth).json()["data"][0]["id"]
    assert request(server, "POST", f"/v1/models/{model}/unload", headers=auth).status == 200
    errors, posts = [], []
    page = open_playground(browser, server, errors, on_request=lambda r: posts.append(r.url)
                           if r.method == "POST" else None)
    loaded = page.locator("#model option", has_text=re.compile(r"● loaded, [\d.]+ [kMG]B$"))
    assert loaded.count() == 0 and "In memory: 0 kB of " in page.inner_text("#memory")
    page.fill("#seed", "7")
    generate_and_wait(page, "a lovely cat", partials=0)
    loaded.wait_for(state="attached", timeout=10_000)  # the list, reloaded after the job
    assert "loaded until" in loaded.get_attribute("title")  # its keep_alive: until when it stays
    source = page.get_attribute("#results img.result-image", "src")
    task = re.search(r"task_id: (\S+)", page.inner_text("#results pre"))[1]
    page.click("#results .result button.variation")
    page.wait_for_selector("#results .result:nth-child(2)", timeout=45_000)
    page.wait_for_selector("#generate:not([disabled])", timeout=10_000)
    assert page.locator("#status.error").count() == 0, page.inner_text("#status")
    assert posts[-1] == server + "/v1/images/variations"
    shown = page.inner_text("#results .result:first-child pre")
    assert f"variation_of: {task}" in shown and "prompt: a lovely cat" in shown and "size: 64x64" in shown
    varied = page.get_attribute("#results .result:first-child img.result-image", "src")
    body, content_type = multipart({
        "image": ("in.png", base64.b64decode(source.split(",", 1)[1])), "prompt": "a lovely cat", "model": model,
        "size": "64x64", "steps": "2", "seed": "7", "response_format": "b64_json"})
    reply = request(server, "POST", "/v1/images/variations", body, {**auth, "Content-Type": content_type})
    assert reply.json()["data"][0]["b64_json"] == varied.split(",", 1)[1]
    assert errors == []
    page.close()


def test_the_lora_picker_offers_the_models_loras_and_tags_the_prompt(server, browser):
    errors = []
    page = open_playground(browser, server, errors)
    page.wait_for_selector("#lora option[value=detail]", state="attached", timeout=20_000)
    assert page.locator("#lora option[value=xl-style]").count() == 0  # an SDXL LoRA, and the model is SD 1.x
    page.fill("#prompt", "a lovely cat")
    page.select_option("#lora", "detail")
    assert page.input_value("#prompt") == "a lovely cat <lora:detail:1>" and page.input_value("#lora") == ""
    assert errors == []
    page.close()


def test_hires_fix_and_upscaling_a_result_in_the_browser(server, browser):
    """The hires toggle sends hr_* (a 64x64 first pass, 2x: a 128x128 image); "Upscale" on a result sends it to
    /v1/images/upscale (Lanczos 2x when no upscaler is converted) and shows the enlarged image."""
    errors, posts = [], []
    page = open_playground(browser, server, errors, on_request=lambda r: posts.append(r) if r.method == "POST" else None)
    page.wait_for_selector("#hr-upscaler option[value=lanczos]", state="attached", timeout=20_000)
    page.check("#hires-on")
    page.select_option("#hr-upscaler", "latent")
    generate_and_wait(page, "a lighthouse", partials=0)
    sent = json.loads(posts[-1].post_data)
    assert (sent["hr_scale"], sent["hr_upscaler"], sent["hr_strength"]) == (2, "latent", 0.5)
    source = page.get_attribute("#results img.result-image", "src")
    assert Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).size == (128, 128)
    page.click("#results .result button.upscale")
    page.wait_for_selector("#results .result:nth-child(2)", timeout=45_000)
    assert page.locator("#status.error").count() == 0, page.inner_text("#status")
    assert posts[-1].url == server + "/v1/images/upscale"
    enlarged = page.get_attribute("#results .result:first-child img.result-image", "src")
    assert Image.open(io.BytesIO(base64.b64decode(enlarged.split(",", 1)[1]))).size == (256, 256)
    assert "upscaled: lanczos 2x" in page.inner_text("#results .result:first-child pre")
    assert errors == []
    page.close()


def test_same_origin_writes_pass_and_other_origins_are_refused(server):
    """Browsers send `Origin` with a same-origin POST: the page's own origin passes, another is still a 403."""
    port = server.rsplit(":", 1)[1]
    body = b'{"prompt": "x", "size": "64x64", "steps": 1}'
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    own = request(server, "POST", "/v1/images/generations", body, {**auth, "Origin": server})
    assert own.status == 200
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"http://localhost:{port}"):
        reply = request(server, "POST", "/v1/images/generations", body, {**auth, "Origin": origin})
        assert reply.status == 403, origin
