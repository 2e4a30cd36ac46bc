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
from mlx_sd_server.job import JOB_FIELDS, Limits, request_schema
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


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(FakeRegistry(), FileStore(tmp_path_factory.mktemp("openapi-files")),
                      Settings(api_key="secret", limits=Limits(max_n=2, max_steps=3)))


def test_no_input_makes_a_server_error(app):
    from hypothesis import given

    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 14
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(headers={"Authorization": "Bearer secret"})
            case.validate_response(response, checks=(not_a_server_error,))

        fuzz()
