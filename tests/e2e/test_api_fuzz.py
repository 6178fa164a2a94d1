"""A bounded schemathesis run against both services' OpenAPI documents, authenticated.

Every operation of the gateway and the control plane gets generated requests (a fixed seed,
a few examples each, about a minute in all on two cores), sent over HTTP to the running
platform. The run fails on any 5xx and on any answer its document does not declare: a status
code, a content type, a body that breaks the declared schema or a missing declared header.
Admin routes get the operator token, tenant routes a fresh tenant's key with every scope;
invocations name that tenant's function, so generated bodies reach admission, the queue and
the worker instead of stopping at "function not found".
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, seed, settings

from launcher.platform import create_tenant_with_key, register_function
from tests.support.platform import PRICE_IN, PRICE_OUT, Platform

pytestmark = [pytest.mark.e2e]

EXAMPLES = 12  # per operation: ~34 operations, ~400 requests
SEED = 20261130
TIMEOUT_S = 30
FUNCTION = "fuzz-a8"


async def _fuzz_tenant(platform: Platform, adapter: Path) -> str:
    tenant_id, key = await create_tenant_with_key(platform.settings, "fuzz")
    await register_function(platform.settings, tenant_id, FUNCTION, "tiny", adapter, PRICE_IN, PRICE_OUT)
    return key


@pytest.fixture(scope="session")
def fuzz_key(platform: Platform, adapter_dirs: dict[str, Path]) -> str:
    """A tenant of its own with one function, so generated requests never touch the other tests' tenants."""
    return asyncio.run(_fuzz_tenant(platform, adapter_dirs["a8"]))


@pytest.fixture(scope="session")
def gateway_schema(platform: Platform) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{platform.url}/openapi.json")


@pytest.fixture(scope="session")
def controlplane_schema(platform: Platform) -> schemathesis.BaseSchema:
    s = platform.settings
    return schemathesis.openapi.from_url(f"http://{s.controlplane_host}:{s.controlplane_port}/openapi.json")


@pytest.fixture(scope="session")
def http() -> requests.Session:
    return requests.Session()


def _headers(case: schemathesis.Case, platform: Platform, key: str) -> dict[str, str]:
    token = platform.settings.admin_token if case.path.startswith("/admin") else key
    return {"Authorization": f"Bearer {token}"}


def _name_the_function(case: schemathesis.Case) -> None:
    """Point invocations at the fuzz tenant's function; everything else stays as generated."""
    if case.path_parameters and "function" in case.path_parameters:
        case.path_parameters["function"] = FUNCTION
    if case.path.endswith("completions") and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = FUNCTION


_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
)

gateway = schemathesis.pytest.from_fixture("gateway_schema")
controlplane = schemathesis.pytest.from_fixture("controlplane_schema")


@gateway.parametrize()
@seed(SEED)
@_settings
def test_gateway_answers_as_documented(
    case: schemathesis.Case, platform: Platform, fuzz_key: str, http: requests.Session
) -> None:
    _name_the_function(case)
    case.call_and_validate(session=http, headers=_headers(case, platform, fuzz_key), timeout=TIMEOUT_S)


@controlplane.parametrize()
@seed(SEED)
@_settings
def test_controlplane_answers_as_documented(
    case: schemathesis.Case, platform: Platform, fuzz_key: str, http: requests.Session
) -> None:
    case.call_and_validate(session=http, headers=_headers(case, platform, fuzz_key), timeout=TIMEOUT_S)
