"""Model specs resolve to servable models: names, converted folders, diffusers folders (converted on first
use), the built-in tiny model; unknown names and offline pulls fail clearly."""

from __future__ import annotations

import argparse

import pytest

import tiny_diffusers
from convert.pull import main as pull
from mlx_sd_server import registry as registry_module
from mlx_sd_server.registry import TINY_MODEL_NAME, ModelNotFoundError, ModelRegistry


def test_diffusers_folder_is_converted_once_and_served_by_name(tmp_path):
    src = tmp_path / "My-Model"
    tiny_diffusers.make_pipeline(src, "sdxl")
    models = tmp_path / "models"
    registry = ModelRegistry([str(src)], models)
    assert registry.names() == ["my-model"] and registry.default_name == "my-model"
    info = registry.info()
    assert info.family == "sdxl" and (info.defaults.width, info.defaults.height) == (1024, 1024)
    assert not info.has_controlnet
    # a second server start finds the converted copy by name
    assert ModelRegistry(["my-model"], models).info("my-model").folder == models / "my-model"
    with pytest.raises(ModelNotFoundError):
        registry.info("nope")


def test_empty_model_dir_serves_the_labelled_tiny_model(tmp_path, caplog):
    registry = ModelRegistry([], tmp_path)
    assert registry.names() == [TINY_MODEL_NAME]
    assert "random weights" in caplog.text


def test_loaded_models_are_evicted_beyond_the_memory_budget(tmp_path, caplog):
    caplog.set_level("INFO", logger="mlx_sd_server.models")
    src = tmp_path / "other"
    tiny_diffusers.make_pipeline(src, "sd1")
    measure = ModelRegistry([TINY_MODEL_NAME, str(src)], tmp_path / "models")
    sizes = [measure.pipeline(name).memory_bytes() for name in (TINY_MODEL_NAME, "other")]
    registry = ModelRegistry([TINY_MODEL_NAME, str(src)], tmp_path / "models", max_memory=max(sizes) + 1)
    first = registry.pipeline()
    assert registry.pipeline(TINY_MODEL_NAME) is first  # kept
    registry.pipeline("other")
    assert registry.loaded() == ["other"]
    assert f"unloaded model {TINY_MODEL_NAME}" in caplog.text and "to make room for other" in caplog.text


def test_unknown_spec_and_offline_pull_fail_clearly(tmp_path, monkeypatch, capsys):
    with pytest.raises(ModelNotFoundError, match="not found"):
        ModelRegistry(["no-such-model"], tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    args = argparse.Namespace(repo_id="someone/some-model", model_dir=str(tmp_path), dtype="float16", quantize=None,
                              name=None, no_t5=False)
    assert pull(args) == 1
    err = capsys.readouterr().err
    assert "offline" in err and "mlx-sd-server convert" in err
    assert not (tmp_path / "some-model").exists()


def test_auto_engine_falls_back_to_torch_when_mlx_cannot_load(tmp_path, monkeypatch, caplog):
    import mlx_sd_server.engine.model_io as model_io
    from mlx_sd_server.torch_engine import TorchPipeline

    def cannot_load(*args, **kwargs):
        raise RuntimeError("no MLX backend here")

    monkeypatch.setattr(model_io, "load_model", cannot_load)
    assert isinstance(ModelRegistry([TINY_MODEL_NAME], tmp_path, engine="auto").pipeline(), TorchPipeline)
    assert "falling back to diffusers/torch" in caplog.text
    with pytest.raises(Exception, match="no MLX backend"):  # without auto, the failure is reported
        ModelRegistry([TINY_MODEL_NAME], tmp_path, engine="mlx").pipeline()


@pytest.mark.parametrize("ram_gib, flag, expected", [(8, None, True), (16, None, False), (8, False, False),
                                                     (64, True, True)])
def test_low_memory_mode_is_automatic_on_8_gb_machines(tmp_path, monkeypatch, ram_gib, flag, expected):
    monkeypatch.setattr(registry_module, "physical_memory", lambda: ram_gib * 2**30)
    registry = ModelRegistry([], tmp_path, low_memory=flag)
    assert registry.low_memory is expected
    assert registry.pipeline().model.low_memory is expected
