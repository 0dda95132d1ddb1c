"""Every operation of our OpenAPI document, driven by schemathesis against a real gateway: no input makes a 5xx.

Inference goes to simulated nodes (instant answers), so thousands of generated requests take a minute.
Half the generated bodies name the served model, so that they reach a node instead of stopping at 404;
the rest keep whatever model the generator made up. The key has every scope and an Admin owner, so every
operation runs as far as its input lets it.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.processes import REPO, Gateway, SimulatedNodes, free_port

pytestmark = pytest.mark.e2e

EXAMPLES = 50
SIM_MODEL = "sim"


class Stack:
    def __init__(self, gateway: Gateway, key: str) -> None:
        self.gateway = gateway
        self.headers = {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("schemathesis")
    gateway = Gateway(data_dir=root, port=free_port())
    gateway.start()
    subprocess.run([sys.executable, "manage.py", "create_user", "fuzzer", "--type", "admin"], cwd=REPO,
                   env=gateway.env, input="a-long-fuzzer-password\n", text=True, check=True, capture_output=True)
    key = gateway.manage("create_api_key", "--name", "fuzzer", "--user", "fuzzer", "--scopes", "inference",
                         "conversations", "management").strip()
    nodes = SimulatedNodes(gateway=gateway, log_dir=root, count=2, model=SIM_MODEL, tokens=3, slots=8)
    nodes.start()
    try:
        yield Stack(gateway, key)
    finally:
        nodes.stop()
        gateway.stop()


def _case_passes(case: Any, stack: Stack, statuses: Counter[str]) -> None:
    if isinstance(case.body, dict) and "model" in case.body and zlib.crc32(repr(case.body).encode()) % 2:
        case.body["model"] = SIM_MODEL
    response = case.call(base_url=stack.gateway.url, headers=stack.headers, timeout=60)
    statuses[f"{case.method} {case.path} {response.status_code}"] += 1
    where = f"{case.method} {case.formatted_path} {str(case.body)[:200]}"
    assert response.status_code < 500, (where, response.text[:500])
    content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis keeps each header's values
    if content_type.startswith("application/json"):
        # The answer has the shape /docs declares for it (the response= schemas), errors included.
        try:
            case.validate_response(response, checks=[response_schema_conformance])
        except Exception as exc:  # noqa: BLE001 - schemathesis raises its own failure group
            raise AssertionError((where, response.text[:500], str(exc)[:1000])) from None
    if response.status_code >= 400:
        error = response.json()["error"]
        assert {"message", "type", "code"} <= set(error), (where, response.text[:500])


def _runner(operation: Any, stack: Stack, counts: dict[str, int], statuses: Counter[str]) -> Any:
    """A Hypothesis test of EXAMPLES cases of `operation` (generated only: a failure is reported, not shrunk)."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        counts[operation.label] += 1
        _case_passes(case, stack, statuses)

    return run


def test_no_generated_request_gets_a_server_error(stack: Stack) -> None:
    """EXAMPLES generated requests per operation (schemathesis's pytest plugin does not run on this pytest, so the
    operations are driven one by one through its strategies)."""
    schema = schemathesis.openapi.from_url(stack.gateway.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    failures: dict[str, str] = {}
    counts: dict[str, int] = {}
    statuses: Counter[str] = Counter()
    for operation in operations:
        counts[operation.label] = 0
        try:
            _runner(operation, stack, counts, statuses)()
        except AssertionError as exc:
            failures[operation.label] = str(exc)[:1000]
    assert not failures, (failures, "gateway log:", stack.gateway.log()[-3000:])
    assert min(counts.values()) >= EXAMPLES, counts
    # Not only refusals: generated requests reached the simulated nodes and the conversation store.
    for answered in ("POST /v1/chat/completions 200", "POST /v1/completions 200", "POST /v1/embeddings 200",
                     "POST /optima/v1/conversations 201", "POST /v1/responses 200"):
        assert statuses[answered], statuses
