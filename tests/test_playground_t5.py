"""The playground's advanced settings: T5's tokens per prompt (`max_sequence_length`) is offered for a model
with T5 only, with the model's own length as its placeholder, and sent only when set. Driven in a real
headless Chromium (tests/test_playground.py's) against a live server with two fake models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from api_server import FakeRegistry, live_server
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.engine.families.spec import Capabilities, TextLength
from mlx_sd_server.job import ModelDefaults
from mlx_sd_server.registry import ModelInfo
from mlx_sd_server.store import FileStore
from test_playground import KEY, browser, generate_and_wait, open_playground  # noqa: F401 - `browser` is a fixture

T5_MODEL = "fake-flux"


@dataclass
class TwoModels(FakeRegistry):
    """The fake SD model, and a fake one with T5 (its own length 256, at most 512); one fake engine for both."""

    def names(self) -> list[str]:
        return [self.default_name, T5_MODEL]

    def info(self, name: str | None = None) -> ModelInfo:
        if name != T5_MODEL:
            return super().info(name)
        return ModelInfo(name=T5_MODEL, family="flux", created=1700000000, defaults=ModelDefaults(),
                         has_controlnet=False, folder=Path("."),
                         capabilities=Capabilities("flux", controlnet=False, text_length=TextLength(256)))

    resolve = info


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    registry = TwoModels()
    app = create_app(registry, FileStore(tmp_path_factory.mktemp("files")), Settings(api_key=KEY))
    with live_server(app) as url:
        yield url, registry.pipeline_


def test_t5_length_is_offered_for_a_t5_model_and_sent_only_when_set(server, browser):  # noqa: F811
    url, pipeline = server
    errors, bodies = [], []
    page = open_playground(browser, url, errors, on_request=lambda r: bodies.append(json.loads(r.post_data))
                           if r.method == "POST" and r.url.endswith("/v1/images/generations") else None)
    page.click("#advanced summary")
    assert page.locator("#t5-length").is_hidden() and page.locator("#no-advanced").is_visible()  # the SD model

    page.select_option("#model", T5_MODEL)
    assert page.locator("#t5-length").is_visible() and page.locator("#no-advanced").is_hidden()
    field = page.locator("#max-sequence-length")
    assert field.get_attribute("placeholder") == "256 (the model's)" and field.get_attribute("max") == "512"
    generate_and_wait(page, "a lovely cat", partials=0)  # not set: the model's own
    field.fill("64")
    generate_and_wait(page, "a lovely cat", partials=0)
    assert "max_sequence_length: 64" in page.inner_text("#results pre")

    page.select_option("#model", "fake-model")  # no T5: hidden, cleared, not sent
    assert page.locator("#t5-length").is_hidden() and field.input_value() == ""
    generate_and_wait(page, "a lovely cat", partials=0)

    assert [body.get("max_sequence_length") for body in bodies] == [None, 64, None]
    assert "max_sequence_length" not in bodies[0] and "max_sequence_length" not in bodies[2]
    assert [(job.model, job.max_sequence_length) for job in pipeline.jobs] == \
        [(T5_MODEL, 256), (T5_MODEL, 64), ("fake-model", None)]
    assert errors == []
    page.close()
