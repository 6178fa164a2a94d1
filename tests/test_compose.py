"""compose.yaml, read as data: services, images, healthchecks, start order, settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from lorafaas.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
APP_SERVICES = ("migrate", "gateway", "controlplane", "gpuworker")
LONG_RUNNING = ("nats", "postgres", "minio", "gateway", "controlplane", "gpuworker")
INTERPOLATION = re.compile(r"\$\{[A-Z0-9_]+:-([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _conditions(service: dict[str, Any]) -> dict[str, str]:
    return {name: spec["condition"] for name, spec in service.get("depends_on", {}).items()}


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def test_the_seven_services(services: dict[str, Any]) -> None:
    assert set(services) == {"nats", "postgres", "minio", "migrate", "gateway", "controlplane", "gpuworker"}


def test_no_top_level_name(compose: dict[str, Any]) -> None:
    # docker-compose 1.29 rejects a top-level `name:`.
    assert "name" not in compose


def test_infrastructure_images(services: dict[str, Any]) -> None:
    assert services["nats"]["image"].startswith("nats:2.10")
    assert services["postgres"]["image"] == "postgres:16"
    assert services["minio"]["image"].split(":")[0] == "minio/minio"


def test_app_services_build_the_repo_image(services: dict[str, Any]) -> None:
    """Services without a model build the torch-free target; only the worker adds torch."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    targets = {line.split()[-1] for line in dockerfile.splitlines() if line.startswith("FROM ") and " AS " in line}
    assert targets == {"service", "worker"}
    torch_free = [name for name in APP_SERVICES if name != "gpuworker"]
    assert len({services[name]["image"] for name in torch_free}) == 1
    for name in torch_free:
        assert services[name]["build"] == {"context": ".", "target": "service"}, name
    assert services["gpuworker"]["build"] == {"context": ".", "target": "worker"}
    assert services["gpuworker"]["image"] not in {services[name]["image"] for name in torch_free}
    service_stage = dockerfile.split(" AS service")[1].split(" AS worker")[0]
    assert not [line for line in service_stage.splitlines() if line.startswith("RUN") and "torch" in line]


def test_services_install_without_the_model_stack() -> None:
    """The gateway and control plane need only the base dependencies: torch sits in the worker extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    model_stack = {"torch", "transformers", "peft", "safetensors"}
    base = {re.split(r"[<>=\[ ]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    worker = {re.split(r"[<>=\[ ]", dep, maxsplit=1)[0] for dep in project["optional-dependencies"]["worker"]}
    assert not base & model_stack
    assert model_stack <= worker


def test_gateway_and_controlplane_start_without_torch() -> None:
    """Importing both apps (what their processes do) loads no model code."""
    code = (
        "import sys, gateway.app, controlplane.main;"
        "loaded = {'torch', 'transformers', 'peft', 'gpuworker'} & set(sys.modules);"
        "sys.exit(f'loaded {sorted(loaded)}' if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_app_commands(services: dict[str, Any]) -> None:
    assert _command(services["gateway"]) == "lorafaas gateway"
    assert _command(services["controlplane"]) == "lorafaas controlplane"
    assert _command(services["gpuworker"]) == "lorafaas worker"
    assert _command(services["migrate"]) == "lorafaas migrate"  # alembic upgrade head + bucket


def test_nats_runs_jetstream_with_a_file_store(services: dict[str, Any]) -> None:
    command = services["nats"]["command"]
    assert "-js" in command
    assert command[command.index("-sd") + 1] == "/data"
    assert any(volume.endswith(":/data") for volume in services["nats"]["volumes"])


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        test = services[name].get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
    assert "healthcheck" not in services["migrate"]  # one-shot
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert any("8080/healthz" in part for part in services["gateway"]["healthcheck"]["test"])
    assert any("8081/healthz" in part for part in services["controlplane"]["healthcheck"]["test"])


def test_start_order(services: dict[str, Any]) -> None:
    assert _conditions(services["migrate"])["postgres"] == "service_healthy"
    for name in ("gateway", "controlplane", "gpuworker"):
        conditions = _conditions(services[name])
        assert conditions["migrate"] == "service_completed_successfully", name
        assert conditions["nats"] == "service_healthy", name
        assert all(c in ("service_healthy", "service_completed_successfully") for c in conditions.values())
    assert _conditions(services["gateway"])["postgres"] == "service_healthy"
    assert _conditions(services["controlplane"])["postgres"] == "service_healthy"
    assert _conditions(services["gpuworker"])["minio"] == "service_healthy"
    assert "postgres" not in _conditions(services["gpuworker"])  # workers never touch SQL


def _with_defaults(value: object) -> str:
    """What compose makes of ``${VAR:-default}`` when VAR is unset."""
    return INTERPOLATION.sub(lambda m: m.group(1), str(value))


def _has_setting(model: type[BaseModel], path: list[str]) -> bool:
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    if len(path) == 1:
        return True
    annotation = field.annotation
    return isinstance(annotation, type) and issubclass(annotation, BaseModel) and _has_setting(annotation, path[1:])


def test_app_env_names_real_settings(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings ignores unknown LORAFAAS_ variables, so a typo would pass silently: catch it here."""
    for name in APP_SERVICES:
        env = services[name]["environment"]
        for key in env:
            assert key.startswith("LORAFAAS_"), (name, key)
            path = key.removeprefix("LORAFAAS_").lower().split("__")
            assert _has_setting(Settings, path), f"{name}: {key} matches no setting"
    for key, value in services["gpuworker"]["environment"].items():
        monkeypatch.setenv(key, _with_defaults(value))
    settings = Settings()
    assert settings.environment == "development"
    assert settings.nats.url == "nats://nats:4222"
    assert settings.database.url == "postgresql+asyncpg://lorafaas:lorafaas@postgres:5432/lorafaas"
    assert settings.s3.endpoint == "minio:9000"
    assert settings.s3.secure is False


def test_dockerfile_and_worker_cache_volume(services: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    # The worker's cache volume is mounted where the image points the cache.
    assert "LORAFAAS_WORKER__CACHE_DIR=/var/lib/lorafaas/cache" in dockerfile
    assert "worker-cache:/var/lib/lorafaas/cache" in services["gpuworker"]["volumes"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_docker_compose_v1_validates() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (v1) is not installed")
    done = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
