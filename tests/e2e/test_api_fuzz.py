"""A bounded schemathesis run against both services' OpenAPI documents, authenticated.

Every operation of the gateway and the control plane gets generated requests (a fixed seed;
valid requests, and requests that break the schema on purpose), sent over HTTP to the running
platform. The run fails on any 5xx and on any answer the document does not declare: a status
code, a content type, a body that breaks the declared schema or a missing declared header.
Admin routes get the operator token, tenant routes a fresh tenant's key with every scope;
invocations name that tenant's function, so generated bodies reach admission, the queue and
the worker instead of stopping at "function not found". About a minute on two cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from launcher.platform import create_tenant_with_key, register_function
from tests.support.platform import PRICE_IN, PRICE_OUT, Platform

pytestmark = [pytest.mark.e2e]

EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 4}  # per operation; ~34 operations
SEED = 20261130
TIMEOUT_S = 30
FUNCTION = "fuzz-a8"
# No 5xx and every answer as documented (status, content type, headers, body), for schema-valid and
# schema-breaking requests alike. Not "schema-valid means accepted": business rules (a function's
# max_tokens, a prompt's context, callback_url only with mode async) refuse some of those with 400.
# Nor "schema-breaking means refused" (schemathesis's negative_data_rejection): its generator counts
# an optional filter sent as the string "null" beside unknown query parameters as a violation,
# which a list route rightly answers with 200; the bounds themselves are tested in
# tests/gateway/test_gateway_inputs.py and tests/controlplane/test_api_inputs.py.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


async def _fuzz_tenant(platform: Platform, adapter: Path) -> str:
    tenant_id, key = await create_tenant_with_key(platform.settings, "fuzz")
    await register_function(platform.settings, tenant_id, FUNCTION, "tiny", adapter, PRICE_IN, PRICE_OUT)
    return key


@pytest.fixture(scope="session")
def fuzz_key(platform: Platform, adapter_dirs: dict[str, Path]) -> str:
    """A tenant of its own with one function, so generated requests never touch the other tests' tenants."""
    return asyncio.run(_fuzz_tenant(platform, adapter_dirs["a8"]))


def _name_the_function(case: schemathesis.Case) -> None:
    """Point invocations at the fuzz tenant's function; everything else stays as generated."""
    if case.path_parameters and "function" in case.path_parameters:
        case.path_parameters["function"] = FUNCTION
    if case.path.endswith("completions") and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = FUNCTION


Headers = Callable[[schemathesis.Case], dict[str, str]]


def _fuzz_operation(
    operation: schemathesis.APIOperation, mode: GenerationMode, http: requests.Session, headers: Headers
) -> str | None:
    """Generated requests for one operation in one mode; the failure found, or None."""

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,  # the same examples every run, not last run's failures first
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report what was found
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        if mode == GenerationMode.POSITIVE:  # a negative case keeps the violation it was built with
            _name_the_function(case)
        case.call_and_validate(session=http, headers=headers(case), checks=CHECKS, timeout=TIMEOUT_S)

    try:
        run()
    except (Exception, BaseExceptionGroup) as e:  # schemathesis groups its failures; the message names each
        return f"{operation.method.upper()} {operation.path} ({mode}): {e}"
    return None


def _fuzz(url: str, headers: Headers) -> list[str]:
    """Run every operation of the document at ``url`` in both modes; the failures, one entry each."""
    schema = schemathesis.openapi.from_url(url)
    http = requests.Session()
    found = (
        _fuzz_operation(result.ok(), mode, http, headers) for result in schema.get_all_operations() for mode in EXAMPLES
    )
    return [failure for failure in found if failure is not None]


def test_both_services_answer_as_documented(platform: Platform, fuzz_key: str) -> None:
    s = platform.settings

    def headers(case: schemathesis.Case) -> dict[str, str]:
        token = s.admin_token if case.path.startswith("/admin") else fuzz_key
        return {"Authorization": f"Bearer {token}"}

    failures = _fuzz(f"{platform.url}/openapi.json", headers)
    failures += _fuzz(f"http://{s.controlplane_host}:{s.controlplane_port}/openapi.json", headers)
    assert not failures, "\n\n".join(failures)
