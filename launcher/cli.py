"""The ``lorafaas`` command: run each service, administer the platform, bring up a dev stack,
and the tenant's commands (``functions``, ``invoke``, ``jobs``, ``usage``, ``bills``, ``keys``: launcher.tenant_cli).

Exit codes: 0 success, 1 a failed operation (message on stderr), 2 bad usage (argparse); the
tenant commands add 3-7 (see launcher.tenant_cli).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from launcher import tenant_cli
from lorafaas.errors import LorafaasError
from lorafaas.heap import freeze_startup_heap
from lorafaas.scopes import ALL_SCOPES
from lorafaas.settings import Settings


def _run_gateway(settings: Settings, _: argparse.Namespace) -> None:
    import uvicorn

    from gateway.app import create_app

    app = create_app(settings)
    freeze_startup_heap()
    uvicorn.run(app, host=settings.gateway_host, port=settings.gateway_port, log_level="warning")


def _run_controlplane(settings: Settings, _: argparse.Namespace) -> None:
    import uvicorn

    from controlplane.main import create_app

    app = create_app(settings)
    freeze_startup_heap()
    uvicorn.run(app, host=settings.controlplane_host, port=settings.controlplane_port, log_level="warning")


def _run_worker(settings: Settings, _: argparse.Namespace) -> None:
    from gpuworker.main import run_worker

    asyncio.run(run_worker(settings))


def _migrate(settings: Settings, _: argparse.Namespace) -> None:
    from launcher.platform import prepare

    asyncio.run(prepare(settings))
    print("database migrated to head; bucket ready")


def _tenant_create(settings: Settings, args: argparse.Namespace) -> None:
    from launcher.platform import create_tenant_with_key

    tenant_id, secret = asyncio.run(create_tenant_with_key(settings, args.name, args.expires_in_days))
    print(tenant_cli.secret_text(f"tenant_id={tenant_id}", secret))


def _key_create(settings: Settings, args: argparse.Namespace) -> None:
    from launcher.platform import create_api_key

    key_id, secret = asyncio.run(
        create_api_key(settings, args.tenant_id, tuple(args.scope or ALL_SCOPES), args.expires_in_days)
    )
    print(tenant_cli.secret_text(f"key_id={key_id}", secret))


def _backbone_register(settings: Settings, args: argparse.Namespace) -> None:
    from launcher.platform import publish_backbone

    folder = Path(args.folder)
    if args.build:
        from gpuworker.models import build_backbone

        build_backbone(folder, args.build, seed=args.seed)
    uri = asyncio.run(publish_backbone(settings, args.name, folder, args.price_input, args.price_output))
    print(f"backbone {args.name} registered at {uri}")


class _UploadProgress:
    """A rich progress bar fed by minio's progress protocol (called from the upload thread)."""

    def __init__(self, progress, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("validating", total=total)

    def set_meta(self, object_name: str, total_length: int) -> None:
        self.progress.update(self.task, description=f"uploading {object_name.rsplit('/', 1)[-1]}")

    def update(self, size: int) -> None:
        self.progress.advance(self.task, size)


def _function_register(settings: Settings, args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from launcher.platform import register_function
    from lorafaas.artifacts import adapter_files

    folder = Path(args.adapter)
    total = sum(p.stat().st_size for p in adapter_files(folder))
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as bar:
        progress = _UploadProgress(bar, total)
        served = asyncio.run(
            register_function(
                settings,
                args.tenant_id,
                args.name,
                args.backbone,
                folder,
                args.price_input,
                args.price_output,
                progress,
            )
        )
    a = served.artifact
    print(f"function {served.function.name} ({served.function.id}) version {a.version} rank {a.rank} sha256 {a.sha256}")


def _bill(settings: Settings, args: argparse.Namespace) -> None:
    from controlplane.services.ledger import picousd_to_usd
    from launcher.platform import bill

    year, month = (int(x) for x in args.month.split("-"))
    result = asyncio.run(bill(settings, args.tenant_id, year, month))
    for line in result.lines:
        print(
            f"{line.function_name:24} {line.invocations:8d} inv {line.input_tokens:10d} in "
            f"{line.output_tokens:10d} out  ${picousd_to_usd(line.amount_picousd)}"
        )
    print(f"{'total':24} ${picousd_to_usd(result.total_picousd)}")


def _dev_services(settings: Settings, args: argparse.Namespace) -> None:
    from launcher.devstack import run_services

    run_services(settings, Path(args.workdir))


def _dev_up(settings: Settings, args: argparse.Namespace) -> None:
    from launcher.demo import dev_up

    asyncio.run(dev_up(settings, Path(args.workdir), args.shape))


def _demo(settings: Settings, args: argparse.Namespace) -> None:
    from launcher.demo import DemoOptions, run_demo

    options = DemoOptions(trace=Path(args.trace), duration_s=args.duration, workdir=Path(args.workdir), seed=args.seed)
    asyncio.run(run_demo(settings, options))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafaas", description="Serverless LoRA inference: run services, administer, demo; the tenant's commands."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gateway", help="run the HTTP gateway").set_defaults(func=_run_gateway)
    sub.add_parser("controlplane", help="run the control plane (event consumer + admin HTTP)").set_defaults(
        func=_run_controlplane
    )
    sub.add_parser("worker", help="run a GPU worker for LORAFAAS_WORKER__BACKBONE").set_defaults(func=_run_worker)
    sub.add_parser("migrate", help="create the database if needed and run alembic upgrade head").set_defaults(
        func=_migrate
    )

    admin = sub.add_parser("admin", help="administer tenants, backbones, functions, bills").add_subparsers(
        dest="admin", required=True
    )
    p = admin.add_parser("create-tenant", help="create a tenant (or reuse one by name) and a new API key")
    p.add_argument("name")
    p.add_argument("--expires-in-days", type=float, default=None)
    p.set_defaults(func=_tenant_create)
    p = admin.add_parser("create-key", help="create another API key for a tenant")
    p.add_argument("--tenant-id", required=True)
    p.add_argument(
        "--scope",
        action="append",
        choices=ALL_SCOPES,
        help="repeat for several (default: all)",
    )
    p.add_argument("--expires-in-days", type=float, default=None)
    p.set_defaults(func=_key_create)
    p = admin.add_parser("register-backbone", help="upload a Hugging Face model folder to S3 and register it")
    p.add_argument("name")
    p.add_argument("folder", help="the model folder (written first with --build)")
    p.add_argument(
        "--build",
        metavar="SHAPE",
        help="build a random-weight backbone of this shape into FOLDER first (tiny, demo, small, llama-7b)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--price-input", type=int, default=0, help="default price, micro-dollars per 1M input tokens")
    p.add_argument("--price-output", type=int, default=0, help="default price, micro-dollars per 1M output tokens")
    p.set_defaults(func=_backbone_register)
    p = admin.add_parser("register-function", help="register a function from a PEFT adapter folder")
    p.add_argument("--tenant-id", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--adapter", required=True, help="folder written by PEFT save_pretrained")
    p.add_argument("--price-input", type=int, default=None, help="micro-dollars per 1M input tokens")
    p.add_argument("--price-output", type=int, default=None, help="micro-dollars per 1M output tokens")
    p.set_defaults(func=_function_register)
    p = admin.add_parser("bill", help="a tenant's bill for a month")
    p.add_argument("--tenant-id", required=True)
    p.add_argument("--month", default=datetime.now(UTC).strftime("%Y-%m"), help="YYYY-MM (default: this month)")
    p.set_defaults(func=_bill)

    dev = sub.add_parser("dev", help="local development").add_subparsers(dest="dev", required=True)
    p = dev.add_parser("services", help="make NATS, Postgres and S3 reachable (start what is missing) until Ctrl-C")
    p.add_argument("--workdir", default=".lorafaas")
    p.set_defaults(func=_dev_services)
    p = dev.add_parser(
        "up", help="the whole stack: services, migrations, demo backbone, control plane, gateway, a worker"
    )
    p.add_argument("--workdir", default=".lorafaas")
    p.add_argument("--shape", default="demo", help="backbone shape built in code (gpuworker.models.SHAPES)")
    p.set_defaults(func=_dev_up)

    p = sub.add_parser(
        "demo", help="stack up, demo functions registered, a slice of the trace replayed, a summary printed"
    )
    p.add_argument("--trace", default="data/AzureLLMInferenceTrace_conv.csv")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of the trace to replay")
    p.add_argument("--workdir", default=".lorafaas")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    tenant_cli.add_commands(sub)
    return parser


def _describe_error(e: Exception) -> str:
    if isinstance(e, LorafaasError):
        return e.message
    from sqlalchemy.exc import ProgrammingError, SQLAlchemyError

    if isinstance(e, ProgrammingError):
        return f"the database schema does not match this version; run `lorafaas migrate` ({e.orig})"
    if isinstance(e, SQLAlchemyError):
        return f"database error: {e.__class__.__name__}: {getattr(e, 'orig', e)}"
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "tenant_command", None):  # HTTP only: no settings, no database
        return tenant_cli.run(args)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        settings = Settings()
        args.func(settings, args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line on stderr and exit 1; the traceback with --verbose
        print(f"lorafaas: error: {_describe_error(e)}", file=sys.stderr)
        logging.getLogger("lorafaas").info("command failed", exc_info=e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
