"""The local dev stack: make NATS, Postgres and S3 reachable, start what is missing.

``DevStack`` probes the addresses in ``Settings``; a service that already answers is left
alone (it belongs to someone else), a missing local one is started here: ``nats-server``
with JetStream, moto's S3 server, or the Debian Postgres cluster. ``down()`` stops only
what this stack started, so a shared server is never stopped or reconfigured.

Nothing is read from the environment here: callers build ``Settings`` and pass it in.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO
from urllib.parse import urlsplit

from rich.console import Console

from lorafaas.errors import ServiceUnavailable
from lorafaas.settings import S3Settings, Settings

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
POSTGRES_CONFIG_DIR = Path("/etc/postgresql")
# Debian installs nats-server to /usr/sbin, which is not on a normal user's PATH.
NATS_SERVER_FALLBACK = Path("/usr/sbin/nats-server")
NATS_START_TIMEOUT_S = 10.0
S3_START_TIMEOUT_S = 30.0  # moto imports a lot before it listens
POSTGRES_START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts connections.

    Raises ``TimeoutError`` after ``timeout_s``, or ``ServiceUnavailable`` at once when
    ``proc`` (the process expected to listen there) exits first.
    """
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if proc is not None and proc.poll() is not None:
            raise ServiceUnavailable(
                f"{_describe(proc)} exited with code {proc.returncode} before listening on {host}:{port}",
                host=host,
                port=port,
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing answered on {host}:{port} within {timeout_s:.1f} s")
        time.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _describe(proc: subprocess.Popen) -> str:
    args = proc.args if isinstance(proc.args, list | tuple) else [proc.args]
    return f"{Path(str(args[0])).name} (pid {proc.pid})"


# --- addresses -----------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _url_address(url: str, default_port: int) -> Address:
    # NATS accepts a comma-separated server list; the first one is the one we manage.
    parts = urlsplit(url.split(",")[0].strip())
    return Address(parts.hostname or "127.0.0.1", parts.port or default_port)


def nats_address(url: str) -> Address:
    """Host and port of the first server of a ``nats://`` URL."""
    return _url_address(url, 4222)


def database_address(url: str) -> Address:
    """Host and port of a SQLAlchemy database URL such as ``postgresql+asyncpg://u@h:5432/db``."""
    return _url_address(url, 5432)


def s3_address(s3: S3Settings) -> Address:
    """Host and port of the S3 endpoint (``host:port`` without scheme, as minio-py takes it)."""
    host, _, port = s3.endpoint.rpartition(":")
    if not host or not port.isdigit():
        return Address(s3.endpoint, 443 if s3.secure else 80)
    return Address(host.strip("[]"), int(port))


# --- processes -----------------------------------------------------------------------


def _log_target(log_path: Path | None) -> IO[bytes] | int:
    if log_path is None:
        return subprocess.DEVNULL
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return log_path.open("ab")


def _spawn(args: list[str], host: str, port: int, timeout_s: float, log_path: Path | None) -> subprocess.Popen:
    """Start ``args``, wait until it listens on ``host:port``; kill it if it never does."""
    log = _log_target(log_path)
    try:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        if not isinstance(log, int):
            log.close()  # the child holds its own descriptor
    try:
        wait_for_port(host, port, timeout_s, proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def stop_process(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Terminate ``proc``; kill it when it has not exited after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


def nats_server_binary() -> str:
    """Path of ``nats-server``, or ``ServiceUnavailable`` saying how to install it."""
    found = shutil.which("nats-server")
    if found:
        return found
    if NATS_SERVER_FALLBACK.exists():
        return str(NATS_SERVER_FALLBACK)
    raise ServiceUnavailable(
        "nats-server not found: install it (`apt-get install nats-server`, or a release from "
        "https://github.com/nats-io/nats-server/releases) or run NATS yourself (`docker compose up nats`)"
    )


def start_nats(port: int, store_dir: Path, host: str = "127.0.0.1", log_path: Path | None = None) -> subprocess.Popen:
    """Start ``nats-server`` with JetStream storing under ``store_dir``; returns once it listens."""
    store_dir.mkdir(parents=True, exist_ok=True)
    args = [nats_server_binary(), "-js", "-a", host, "-p", str(port), "-sd", str(store_dir)]
    return _spawn(args, host, port, NATS_START_TIMEOUT_S, log_path)


def start_s3(port: int, host: str = "127.0.0.1", log_path: Path | None = None) -> subprocess.Popen:
    """Start moto's S3-compatible server (in memory, any credentials); returns once it listens."""
    args = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    return _spawn(args, host, port, S3_START_TIMEOUT_S, log_path)


# --- S3 ------------------------------------------------------------------------------


def ensure_bucket(s3: S3Settings) -> None:
    """Create ``s3.bucket`` unless it exists (safe when several callers race)."""
    from minio import Minio
    from minio.error import S3Error

    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=s3.secure, region=s3.region)
    if client.bucket_exists(s3.bucket):
        return
    try:
        client.make_bucket(s3.bucket)
    except S3Error as e:
        if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


# --- Postgres ------------------------------------------------------------------------


def postgres_clusters(config_dir: Path = POSTGRES_CONFIG_DIR) -> list[str]:
    """Versions of the Debian ``main`` clusters, newest first."""
    if not config_dir.is_dir():
        return []
    versions = [d.name for d in config_dir.iterdir() if (d / "main").is_dir()]
    return sorted(versions, key=lambda v: [int(p) if p.isdigit() else 0 for p in v.split(".")], reverse=True)


def _pg_ctlcluster(version: str, action: str) -> None:
    args = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServiceUnavailable(
            f"`{' '.join(args)}` failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}",
            version=version,
        )


def start_postgres(database_url: str, timeout_s: float = POSTGRES_START_TIMEOUT_S) -> str | None:
    """Make the database of ``database_url`` reachable.

    Returns ``None`` when it already answers, else the version of the Debian cluster this
    call started (pass it to ``stop_postgres``). Raises ``ServiceUnavailable`` when the
    database is remote or no local cluster exists.
    """
    address = database_address(database_url)
    if port_open(address.host, address.port):
        return None
    clusters = postgres_clusters()
    if not address.is_local or not clusters:
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable at {address} and there is no local cluster to start: "
            "install it (`apt-get install postgresql`) or run it yourself (`docker compose up postgres`)",
            host=address.host,
            port=address.port,
        )
    version = clusters[0]
    _pg_ctlcluster(version, "start")
    wait_for_port(address.host, address.port, timeout_s)
    return version


def stop_postgres(version: str) -> None:
    """Stop the Debian cluster that ``start_postgres`` started."""
    _pg_ctlcluster(version, "stop")


# --- the stack -----------------------------------------------------------------------


@dataclass
class _Owned:
    """A service this stack started, with what stops it."""

    name: str
    stop: Callable[[], None]
    proc: subprocess.Popen | None = None


class DevStack:
    """NATS, Postgres and S3 for local development; a context manager.

    ``up()`` starts what is missing and creates the bucket; ``down()`` stops only what
    ``up()`` started. ``started`` names the services this stack started and still owns.
    """

    def __init__(self, settings: Settings, workdir: Path, console: Console | None = None) -> None:
        self.settings = settings
        self.workdir = workdir
        self.console = console or Console(stderr=True)
        self._owned: list[_Owned] = []

    @property
    def started(self) -> list[str]:
        return [owned.name for owned in self._owned]

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    def up(self) -> None:
        """Make every service reachable, starting the missing ones; stop them again on failure."""
        try:
            self._ensure_nats()
            self._ensure_postgres()
            self._ensure_s3()
            with self.console.status(f"creating bucket {self.settings.s3.bucket}"):
                ensure_bucket(self.settings.s3)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop what ``up()`` started, newest first; leave everything else running."""
        while self._owned:
            owned = self._owned.pop()
            with self.console.status(f"stopping {owned.name}"):
                owned.stop()
            self.console.print(f"[yellow]stopped[/] {owned.name}")

    def dead(self) -> list[str]:
        """Names of started processes that have exited on their own."""
        return [o.name for o in self._owned if o.proc is not None and o.proc.poll() is not None]

    def __enter__(self) -> DevStack:
        self.up()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    # --- one service each ---------------------------------------------------------

    def _reachable(self, name: str, address: Address) -> bool:
        if port_open(address.host, address.port):
            self.console.print(f"[green]found[/] {name} at {address}")
            return True
        if not address.is_local:
            raise ServiceUnavailable(f"{name} is not reachable at {address}, which is not local: start it there")
        return False

    def _own_process(self, name: str, address: Address, proc: subprocess.Popen) -> None:
        self._owned.append(_Owned(name, lambda: stop_process(proc), proc))
        self.console.print(f"[green]started[/] {name} at {address} (pid {proc.pid}, log {self.logs_dir / name}.log)")

    def _ensure_nats(self) -> None:
        address = nats_address(self.settings.nats.url)
        if self._reachable("nats", address):
            return
        with self.console.status(f"starting nats-server on {address}"):
            proc = start_nats(address.port, self.workdir / "nats", address.host, self.logs_dir / "nats.log")
        self._own_process("nats", address, proc)

    def _ensure_s3(self) -> None:
        address = s3_address(self.settings.s3)
        if self._reachable("s3", address):
            return
        with self.console.status(f"starting moto S3 on {address}"):
            proc = start_s3(address.port, address.host, self.logs_dir / "s3.log")
        self._own_process("s3", address, proc)

    def _ensure_postgres(self) -> None:
        address = database_address(self.settings.database.url)
        if self._reachable("postgres", address):
            return
        with self.console.status(f"starting the PostgreSQL cluster for {address}"):
            version = start_postgres(self.settings.database.url)
        if version is not None:
            self._owned.append(_Owned("postgres", lambda: stop_postgres(version)))
            self.console.print(f"[green]started[/] postgres {version} at {address}")


# --- entry point ---------------------------------------------------------------------


@contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM; the previous handlers come back afterwards."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_services(settings: Settings, workdir: Path, console: Console | None = None) -> int:
    """Bring the stack up and block until SIGINT/SIGTERM, then bring it down.

    Returns a process exit code: 0 after a signal, 1 when a started service died on its own.
    Must run in the main thread (signal handlers).
    """
    stack = DevStack(settings, workdir, console)
    with _stop_signals() as stop, stack:
        stack.console.print("[bold]dev services up[/]; Ctrl-C stops what was started here")
        while not stop.wait(1.0):
            if dead := stack.dead():
                stack.console.print(f"[red]exited on its own:[/] {', '.join(dead)} (see {stack.logs_dir})")
                return 1
    return 0
