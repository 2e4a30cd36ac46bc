"""LoRAs in a request: `<lora:name:weight>` tags and the `loras` field, validated before a job is queued."""

from __future__ import annotations

import pytest

from mlx_sd_server.job import Capabilities, JobError, Limits, build_job

FAMILIES = {"detail": "sd1", "ink": "sd1", "styles/film": "sd1", "flux-realism": "flux"}


def lora_family(name: str) -> str:
    if name not in FAMILIES:
        raise JobError(f"no LoRA named {name!r}", "loras", "lora_not_found")
    return FAMILIES[name]


def job(capabilities: Capabilities = Capabilities(family="sd1"), **fields):
    return build_job({"prompt": "a cat", **fields}, capabilities=capabilities, lora_family=lora_family)


def refused(**fields) -> JobError:
    with pytest.raises(JobError) as caught:
        job(**fields)
    return caught.value


def test_tags_are_stripped_from_both_prompts_and_become_loras():
    made = job(prompt="a <lora:detail:0.8>cat, <LORA:styles/film>", negative_prompt="blurry <lora:ink:-1.5>")
    assert made.prompt == "a cat," and made.negative_prompt == "blurry"  # no stray space where a tag was
    assert made.loras == (("detail", 0.8), ("styles/film", 1.0), ("ink", -1.5))


def test_the_loras_field_adds_to_the_tags_and_takes_json_text_from_forms():
    made = job(prompt="<lora:detail:0.5> a cat", loras=[{"name": "ink", "scale": 0.6}, {"name": "styles/film"}])
    assert made.loras == (("detail", 0.5), ("ink", 0.6), ("styles/film", 1.0))
    assert job(loras='[{"name": "ink", "scale": "0.25"}]').loras == (("ink", 0.25),)
    assert job(loras=[]).loras == () and job().loras == ()


@pytest.mark.parametrize("fields, param, code", [
    ({"prompt": "a <lora:nothing:1> cat"}, "prompt", "lora_not_found"),
    ({"negative_prompt": "<lora:nothing>"}, "negative_prompt", "lora_not_found"),
    ({"loras": [{"name": "nothing"}]}, "loras", "lora_not_found"),
    ({"prompt": "<lora:flux-realism:1> a cat"}, "prompt", "lora_family_mismatch"),
    ({"prompt": "<lora:detail:1> <lora:detail:0.5> a cat"}, "prompt", "invalid_value"),
    ({"prompt": "<lora:detail:1> a cat", "loras": [{"name": "detail"}]}, "loras", "invalid_value"),
    ({"prompt": "<lora:detail:lots> a cat"}, "prompt", "invalid_type"),
    ({"prompt": "<lora:detail:1:0.5> a cat"}, "prompt", "invalid_value"),
    ({"prompt": "<lora::1> a cat"}, "prompt", "invalid_value"),
    ({"prompt": "<lora:detail:11> a cat"}, "prompt", "out_of_range"),
    ({"prompt": "<lora:detail:1>"}, "prompt", "invalid_value"),  # nothing left to draw
    ({"loras": {"name": "detail"}}, "loras", "invalid_type"),
    ({"loras": "detail"}, "loras", "invalid_type"),
    ({"loras": [{"scale": 1}]}, "loras", "invalid_type"),
    ({"loras": [{"name": "detail", "weight": 1}]}, "loras", "unknown_field"),
    ({"loras": [{"name": "detail", "scale": "much"}]}, "loras", "invalid_type"),
    ({"loras": [{"name": " "}]}, "loras", "invalid_value"),
])
def test_bad_loras_are_400s_naming_the_field(fields, param, code):
    error = refused(**fields)
    assert (error.param, error.code, error.status) == (param, code, 400), error.message


def test_errors_name_the_lora_and_the_families():
    assert "nothing" in refused(prompt="<lora:nothing:1> a cat").message
    message = refused(prompt="<lora:flux-realism:1> a cat").message
    assert "flux-realism" in message and "flux" in message and "sd1" in message


def test_a_flux_model_takes_flux_loras():
    made = job(Capabilities(family="flux", guidance=True), prompt="<lora:flux-realism:0.9> a cat")
    assert made.loras == (("flux-realism", 0.9),)


def test_at_most_max_loras():
    limits = Limits(max_loras=2)
    with pytest.raises(JobError) as caught:
        build_job({"prompt": "<lora:detail><lora:ink> a cat", "loras": [{"name": "styles/film"}]}, limits=limits,
                  lora_family=lora_family)
    assert caught.value.code == "out_of_range" and "2" in caught.value.message


def test_without_a_lora_folder_tags_are_refused_not_read_as_words():
    with pytest.raises(JobError) as caught:
        build_job({"prompt": "<lora:detail:1> a cat"})
    assert caught.value.code == "unsupported_parameter"


def test_generate_takes_lora_options_as_the_loras_field():
    from types import SimpleNamespace

    from mlx_sd_server.cli import build_parser
    from mlx_sd_server.generate import job_from_args
    from mlx_sd_server.job import ModelDefaults
    from mlx_sd_server.registry import ModelInfo

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "a cat <lora:styles/film:0.3>",
                                      "--lora", "detail:0.5", "--lora", "ink"])
    info = ModelInfo(name="m", family="sd1", created=0, defaults=ModelDefaults(), has_controlnet=False, folder=None,
                     capabilities=Capabilities("sd1", controlnet=False))
    registry = SimpleNamespace(default_name="m", info=lambda: info, loras=SimpleNamespace(family=lora_family),
                               upscalers=SimpleNamespace(names=lambda: []))
    job = job_from_args(args, registry)
    assert job.prompt == "a cat" and job.loras == (("styles/film", 0.3), ("detail", 0.5), ("ink", 1.0))


@pytest.mark.parametrize("name, steps", [
    ("Qwen-Image-Lightning-8steps-V1.0", 8), ("lightx2v/Qwen-Image-Lightning-4steps-V2.0-bf16", 4),
    ("sdxl_lightning_2step_lora", 2), ("Hyper-SD15-8steps-lora", 8)])
def test_a_few_step_lora_brings_its_steps_and_no_cfg_unless_the_request_sets_them(name, steps):
    def job(**fields):
        return build_job({"prompt": "a cat", **fields}, capabilities=Capabilities(family="sd1"),
                         lora_family=lambda lora: "sd1")

    plain = job()
    lightning = job(loras=[{"name": name}])
    assert (lightning.steps, lightning.cfg_scale) == (steps, 1.0) != (plain.steps, plain.cfg_scale)
    tagged = job(prompt=f"<lora:{name}:0.8> a cat")
    assert (tagged.steps, tagged.cfg_scale) == (steps, 1.0)
    mine = job(loras=[{"name": name}], steps=12, cfg_scale=2.5)
    assert (mine.steps, mine.cfg_scale) == (12, 2.5)
    assert job(loras=[{"name": "detail-steps"}]).steps == plain.steps  # not a few-step LoRA's name
