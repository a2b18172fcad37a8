"""Schemathesis against /openapi.json of one real server (started once for the module, small limits so that
every generated request finishes quickly): every documented operation except the /gyges admin ones, with
schemathesis' default generation for pytest. Checks: no 5xx, every status code is documented, every response has a documented
content type and matches its schema. Bounded: FUZZ_EXAMPLES examples per operation (a few minutes on 2 cores).
"""

import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from server_utils import ServerProcess, stop_and_check

FUZZ_EXAMPLES = int(os.environ.get("SGLANG_FUZZ_EXAMPLES", "12"))
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def fuzz_server(test_model):
    # A short context bounds every generation; small n / batch limits bound the work of one request.
    srv = ServerProcess(test_model("llama"), "--context-length", "96", "--max-parallel-samples", "4",
                        "--max-batch-prompts", "8", "--max-running-requests", "16")
    yield srv
    assert srv.get("/health").status_code == 200, "the server is not healthy after the fuzzing"
    stop_and_check(srv)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json").exclude(path_regex="^/gyges")


schema = schemathesis.pytest.from_fixture("api_schema")


def test_openapi_document(fuzz_server):
    doc = requests.get(fuzz_server.url + "/openapi.json", timeout=30).json()
    paths = doc["paths"]
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/health", "/abort_request",
                 "/get_server_info", "/v1/models"):
        assert path in paths, path
    for path, ops in paths.items():
        for method, op in ops.items():
            assert "200" in op["responses"], (method, path)
    for path in ("/generate", "/abort_request", "/v1/completions", "/v1/chat/completions"):
        assert "requestBody" in paths[path]["post"], path
    gen = paths["/generate"]["post"]
    assert gen["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateRequest")
    assert {"400", "413", "503"} <= set(gen["responses"])
    assert "GenerateResponse" in doc["components"]["schemas"]


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzz(case):
    case.call_and_validate(checks=CHECKS, timeout=120)
