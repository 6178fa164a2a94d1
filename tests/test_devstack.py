"""The dev stack against real processes: a private nats-server and moto S3 per test module.

The shared NATS (127.0.0.1:4222) and Postgres are only probed here, never stopped.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from minio import Minio
from rich.console import Console

from launcher.devstack import (
    DevStack,
    ServiceUnavailable,
    database_address,
    ensure_bucket,
    free_port,
    nats_address,
    port_open,
    s3_address,
    start_nats,
    start_s3,
    stop_process,
    wait_for_port,
)
from lorafaas.settings import S3Settings, Settings

pytestmark = pytest.mark.integration

SHARED_NATS_URL = "nats://127.0.0.1:4222"
SHARED_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def _quiet() -> Console:
    return Console(file=io.StringIO())


def _minio(s3: S3Settings) -> Minio:
    return Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=s3.secure, region=s3.region)


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[S3Settings]:
    """One private moto server for the module (it takes a couple of seconds to start)."""
    port = free_port()
    proc = start_s3(port)
    try:
        yield S3Settings(endpoint=f"127.0.0.1:{port}", bucket="devstack-test")
    finally:
        stop_process(proc)


def test_addresses_come_from_settings() -> None:
    assert str(nats_address("nats://10.0.0.5:4223,nats://10.0.0.6:4223")) == "10.0.0.5:4223"
    assert str(nats_address("nats://nats")) == "nats:4222"
    assert str(database_address("postgresql+asyncpg://u:p@db.local/x")) == "db.local:5432"
    assert str(s3_address(S3Settings(endpoint="minio:9000"))) == "minio:9000"
    assert str(s3_address(S3Settings(endpoint="s3.amazonaws.com", secure=True))) == "s3.amazonaws.com:443"


def test_wait_for_port_times_out_with_a_clear_message() -> None:
    port = free_port()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        wait_for_port("127.0.0.1", port, 0.2)


async def test_private_nats_answers_jetstream(tmp_path: Path) -> None:
    port = free_port()
    proc = start_nats(port, tmp_path / "store")
    try:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            info = await nc.jetstream().account_info()
            assert info.limits is not None
        finally:
            await nc.close()
    finally:
        stop_process(proc)
    assert proc.returncode is not None
    assert not port_open("127.0.0.1", port)


def test_ensure_bucket_then_put_and_get(moto_s3: S3Settings) -> None:
    ensure_bucket(moto_s3)
    ensure_bucket(moto_s3)  # a second call finds it and does nothing
    client = _minio(moto_s3)
    client.put_object(moto_s3.bucket, "hello.txt", io.BytesIO(b"hi"), length=2)
    response = client.get_object(moto_s3.bucket, "hello.txt")
    try:
        assert response.read() == b"hi"
    finally:
        response.close()
        response.release_conn()


def test_stack_with_everything_running_starts_and_stops_nothing(moto_s3: S3Settings, tmp_path: Path) -> None:
    if not (port_open("127.0.0.1", 4222) and port_open("127.0.0.1", 5432)):
        pytest.skip("the shared NATS (4222) and Postgres (5432) are not running")
    settings = Settings(nats={"url": SHARED_NATS_URL}, database={"url": SHARED_DATABASE_URL}, s3=moto_s3.model_dump())
    with DevStack(settings, tmp_path, _quiet()) as stack:
        assert stack.started == []
        assert _minio(moto_s3).bucket_exists(moto_s3.bucket)
    assert port_open("127.0.0.1", 4222)
    assert port_open("127.0.0.1", 5432)
    s3 = s3_address(moto_s3)
    assert port_open(s3.host, s3.port)


def test_stack_starts_missing_nats_and_s3_and_stops_only_those(tmp_path: Path) -> None:
    if not port_open("127.0.0.1", 5432):
        pytest.skip("the shared Postgres (5432) is not running")
    nats_port, s3_port = free_port(), free_port()
    s3 = S3Settings(endpoint=f"127.0.0.1:{s3_port}", bucket="devstack-owned")
    settings = Settings(
        nats={"url": f"nats://127.0.0.1:{nats_port}"}, database={"url": SHARED_DATABASE_URL}, s3=s3.model_dump()
    )
    stack = DevStack(settings, tmp_path, _quiet())
    stack.up()
    try:
        assert sorted(stack.started) == ["nats", "s3"]
        assert port_open("127.0.0.1", nats_port)
        assert _minio(s3).bucket_exists(s3.bucket)
        assert (tmp_path / "nats").is_dir()
        assert (tmp_path / "logs" / "nats.log").exists()
    finally:
        stack.down()
    assert stack.started == []
    assert not port_open("127.0.0.1", nats_port)
    assert not port_open("127.0.0.1", s3_port)
    assert port_open("127.0.0.1", 5432)
    stack.down()  # idempotent


def test_failed_up_stops_what_it_had_started(tmp_path: Path) -> None:
    """NATS starts, then an unreachable remote database fails up(): the private NATS is stopped."""
    nats_port = free_port()
    settings = Settings(
        nats={"url": f"nats://127.0.0.1:{nats_port}"},
        database={"url": "postgresql+asyncpg://u@192.0.2.1:5432/x"},  # TEST-NET-1: never answers
    )
    stack = DevStack(settings, tmp_path, _quiet())
    with pytest.raises(ServiceUnavailable, match="192.0.2.1:5432"):
        stack.up()
    assert stack.started == []
    assert not port_open("127.0.0.1", nats_port)


RUN_SERVICES = """
import sys
from pathlib import Path
from launcher.devstack import run_services
from lorafaas.settings import Settings
settings = Settings(
    nats={"url": "nats://127.0.0.1:%d"},
    database={"url": "%s"},
    s3={"endpoint": "127.0.0.1:%d"},
)
sys.exit(run_services(settings, Path(sys.argv[1])))
"""


def test_run_services_downs_on_sigterm(tmp_path: Path) -> None:
    if not port_open("127.0.0.1", 5432):
        pytest.skip("the shared Postgres (5432) is not running")
    nats_port, s3_port = free_port(), free_port()
    code = RUN_SERVICES % (nats_port, SHARED_DATABASE_URL, s3_port)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port("127.0.0.1", nats_port, 15, proc)
        wait_for_port("127.0.0.1", s3_port, 30, proc)
        _wait_for_bucket(S3Settings(endpoint=f"127.0.0.1:{s3_port}"), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, err
    assert not port_open("127.0.0.1", nats_port)
    assert not port_open("127.0.0.1", s3_port)


def _wait_for_bucket(s3: S3Settings, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """up() has finished once the bucket exists (it is the last step)."""
    deadline = time.monotonic() + timeout_s
    while not _minio(s3).bucket_exists(s3.bucket):
        assert proc.poll() is None, "run_services exited early"
        assert time.monotonic() < deadline, "the bucket never appeared"
        time.sleep(0.1)


@pytest.mark.e2e
def test_dev_up_stops_every_child_on_sigterm(tmp_path: Path, s3_port: int) -> None:
    """`lorafaas dev up` under a service manager: SIGTERM stops gateway, control plane and worker."""
    import asyncio
    import os
    import uuid

    from launcher.stack import settings_env
    from tests.conftest import drop_private_state, make_settings

    suffix = uuid.uuid4().hex[:8]
    settings = make_settings(tmp_path, s3_port, f"lorafaas_devup_{suffix}", f"ldu{suffix}")
    workdir = tmp_path / "devup"
    env = {**os.environ, **settings_env(settings)}
    cmd = [sys.executable, "-m", "launcher.cli", "dev", "up", "--shape", "tiny", "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(settings.gateway_host, settings.gateway_port, 300, proc)
        _wait_for_output(proc, "demo API key", 300)
        children = _children(proc.pid)
        assert len(children) >= 3, children  # control plane, gateway, worker
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        stop_process(proc)
        asyncio.run(drop_private_state(settings))
    assert proc.returncode == 0
    assert not port_open(settings.gateway_host, settings.gateway_port)
    assert not port_open(settings.controlplane_host, settings.controlplane_port)
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []


def _wait_for_output(proc: subprocess.Popen, text: str, timeout_s: float) -> None:
    """Reads the child's output until ``text`` appears (its stdout is a pipe we must keep draining)."""
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        assert line or proc.poll() is None, "dev up exited early"
    raise AssertionError(f"{text!r} not printed within {timeout_s:g}s")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` that are still running (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found
