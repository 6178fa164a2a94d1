"""The gateway's boundaries without services: what its process loads, where callbacks may go,
and what its OpenAPI document promises."""

from __future__ import annotations

import ast
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from controlplane.services.egress import EgressPolicy
from lorafaas.errors import InvalidInput
from lorafaas.settings import Settings

pytestmark = pytest.mark.unit

# Loaded by the control plane for registration and callbacks; the gateway never uses them.
NOT_IN_GATEWAY = (
    "numpy",
    "torch",
    "safetensors",
    "httpx",
    "controlplane.callbacks",
    "controlplane.services.validation",
    "controlplane.services.catalog",
    "controlplane.services.uploads",
)


def test_the_gateway_process_loads_no_numpy_validator_or_callback_dispatcher() -> None:
    probe = (
        "import json, sys; from gateway.app import create_app; from lorafaas.settings import Settings; "
        "create_app(Settings()).openapi(); print(json.dumps(sorted(sys.modules)))"
    )
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True).stdout))
    assert "gateway.service" in loaded and "controlplane.services.invocations" in loaded
    unwanted = sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in NOT_IN_GATEWAY))
    assert unwanted == []


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_callbacks_never_reach_private_addresses_by_default(address: str) -> None:
    assert not EgressPolicy().permits(ipaddress.ip_address(address))


def test_public_addresses_and_allowed_networks_are_permitted() -> None:
    policy = EgressPolicy(["127.0.0.0/8", "10.20.0.0/16"])
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "127.0.0.1", "10.20.3.4"):
        assert policy.permits(ipaddress.ip_address(address)), address
    assert not policy.permits(ipaddress.ip_address("10.21.0.1"))
    assert not policy.permits(ipaddress.ip_address("169.254.169.254"))


def test_callback_urls_are_checked_on_accept() -> None:
    policy = EgressPolicy()
    policy.check_url("https://hooks.example.com/lorafaas?x=1")
    for url in (
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://api.localhost/hook",
        "http://[::1]/",
        "http://169.254.169.254/latest",
        "https://example.com/\x00",
        "https://exa mple.com/",
        "gopher://example.com/",
        "http:///nohost",
        "http://example.com:70000/",
    ):
        with pytest.raises(InvalidInput) as refused:
            policy.check_url(url)
        assert refused.value.details["param"] == "callback_url", url
    EgressPolicy(["127.0.0.0/8"]).check_url("http://localhost:9000/hook")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_name_that_resolves_to_loopback_is_refused_before_delivery() -> None:
    reason = await EgressPolicy().refused_address("http://localhost:9/hook")
    assert reason is not None and ("127.0.0.1" in reason or "::1" in reason), reason
    assert await EgressPolicy(["127.0.0.0/8", "::1/128"]).refused_address("http://localhost:9/hook") is None


def _openapi(app_factory) -> dict:
    return app_factory(Settings()).openapi()


def test_openapi_documents_every_error_status_in_the_error_shape() -> None:
    from controlplane.main import create_app as controlplane_app
    from gateway.app import create_app as gateway_app

    for document in (_openapi(gateway_app), _openapi(controlplane_app)):
        assert "HTTPValidationError" not in json.dumps(document)  # validation errors answer 400, not 422
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                responses = operation["responses"]
                for status in ("400", "401", "503"):
                    schema = responses[status]["content"]["application/json"]["schema"]
                    assert schema["$ref"].endswith("/ErrorResponse"), (method, path, status)
                assert "Retry-After" in responses["503"]["headers"], (method, path)
    gateway = _openapi(gateway_app)["paths"]
    for path in ("/v1/functions/{function}/invoke", "/v1/completions", "/v1/chat/completions"):
        responses = gateway[path]["post"]["responses"]
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}, path
        assert {"402", "403", "404", "409", "429", "502", "504"} <= set(responses), path
    assert "202" in gateway["/v1/functions/{function}/invoke"]["post"]["responses"]


def test_gateway_modules_build_no_sql_of_their_own() -> None:
    """Rows are read and written through control-plane repository functions, not gateway SQL."""
    builders = {"select", "insert", "update", "delete", "text", "func", "bindparam"}
    offenders = []
    for path in sorted(Path(gateway.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name in builders]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if (
                    node.func.attr in {"execute", "scalar", "scalars", "add", "delete", "flush"}
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in {"session", "connection", "conn"}
                ):
                    offenders.append(f"{path.name}:{node.lineno}: session.{node.func.attr}")
    assert offenders == []
