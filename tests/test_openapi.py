"""/openapi.json describes what the parsers check (it is built from their schemas), and a property-based
fuzz of every operation in it (schemathesis, bounded examples, derandomized) gets no response >= 500."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from api_server import FakeRegistry
from mlx_sd_server.api import Settings, create_app
from mlx_sd_server.api.openapi import openapi_document
from mlx_sd_server.job import JOB_FIELDS, Job, Limits, ModelDefaults, build_job, request_schema
from mlx_sd_server.store import FileStore

EXAMPLES = 40  # per operation: enough to reach every field and status, quick enough for every run


def test_the_document_covers_every_field_the_parser_takes():
    document = openapi_document(Limits(max_n=4))
    body = document["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    properties = body["schema"]["properties"]
    assert set(JOB_FIELDS) <= set(properties)
    assert properties["n"]["maximum"] == 4  # the server's own limits
    assert properties["sample_method"]["enum"] == request_schema()["sample_method"]["enum"]
    edits = document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert edits["schema"]["properties"]["image"]["format"] == "binary"


def test_one_table_makes_the_job_defaults_the_schema_and_the_model_overlay():
    schema = request_schema()
    plain = build_job({"prompt": "x"})
    assert plain == Job(prompt="x")  # the Job's defaults are build_job's
    for name, value in vars(plain).items():
        if "default" in schema.get(name, {}):
            assert value == schema[name]["default"], name
    lcm = ModelDefaults(steps=4, cfg_scale=1.5, sample_method="lcm", scheduler="lcm", width=768, height=512)
    made = build_job({"prompt": "x"}, defaults=lcm)  # a manifest's defaults over the table's
    assert (made.steps, made.cfg_scale, made.sample_method, made.scheduler, made.width, made.height) == \
        (4, 1.5, "lcm", "lcm", 768, 512)
    assert (made.n, made.seed, made.strength) == (plain.n, plain.seed, plain.strength)
    assert build_job({"prompt": "x", "steps": "6", "size": "auto"}, defaults=lcm).steps == 6
    assert "default" not in schema["steps"] and schema["steps"]["description"].endswith("(default: the model's)")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(FakeRegistry(), FileStore(tmp_path_factory.mktemp("openapi-files")),
                      Settings(api_key="secret", limits=Limits(max_n=2, max_steps=3)))


def test_no_input_makes_a_server_error(app):
    from hypothesis import given

    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 37
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(headers={"Authorization": "Bearer secret"})
            case.validate_response(response, checks=(not_a_server_error,))

        fuzz()
