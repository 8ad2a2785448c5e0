"""Property-based fuzzing (schemathesis) of the gateway from its own /openapi.json: whatever the schema allows, or
nearly allows, never gets a 5xx, and every response conforms to the schema (status, content type, body, headers).

The gateway runs in this process before a fake worker (tests/gateway/fake.py), with --max-tokens-limit 8 so that
each example is cheap; the example count is bounded so the test stays well under a minute."""
import tempfile
from pathlib import Path

import pytest
import schemathesis
from fake import FakeWorker, LocalGateway, gateway_config
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzzed(demo_model):
    from services.gateway.text import TextCodec

    codec = TextCodec(demo_model)
    with tempfile.TemporaryDirectory(prefix="gw", dir="/tmp") as state:  # short: ipc:// paths are at most 107 bytes
        cfg = gateway_config(demo_model, Path(state), max_tokens_limit=8)
        worker = FakeWorker(cfg.worker_addr, len(codec.tokenizer))
        gateway = LocalGateway(cfg, codec)
        gateway.wait_ready()
        yield gateway
        gateway.close()
        worker.close()


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")


# schemathesis' own pytest plugin does not run under pytest 9: each operation is driven by hypothesis directly
@pytest.mark.parametrize("method,path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/v1/models"), ("GET", "/health")])
def test_gateway_conforms_to_its_openapi(api_schema, fuzzed, method, path):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        case.call_and_validate(base_url=fuzzed.url, checks=CHECKS)

    check()
