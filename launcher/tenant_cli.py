"""The tenant's commands of ``lorafaas``: functions, invoke, jobs, usage, bills, keys.

They speak HTTP to the public APIs only (httpx): the gateway (``LORAFAAS_URL`` or ``--url``)
for invocations and jobs, the control plane (``LORAFAAS_CONTROLPLANE_URL`` or
``--controlplane-url``) for functions, usage, bills and keys; the key is ``LORAFAAS_API_KEY`` or
``--api-key``. ``--json`` prints the API's JSON for scripts. Errors go to stderr.

Exit codes: 0 success; 1 the operation failed (an invocation failed, a server error);
2 bad usage; 3 not authenticated or not allowed (401, 403); 4 not found (404); 5 refused
input (400, 409, 422: an adapter's problem names the file and the field); 6 over a quota or
limit (402, 429); 7 the platform cannot be reached.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from lorafaas import wire
from lorafaas.artifacts import adapter_files
from lorafaas.errors import InvalidArtifact
from lorafaas.scopes import ALL_SCOPES

OK, FAILED, USAGE, AUTH, NOT_FOUND, INVALID, LIMITED, UNREACHABLE = 0, 1, 2, 3, 4, 5, 6, 7
EXIT_OF_STATUS = {
    400: INVALID,
    401: AUTH,
    402: LIMITED,
    403: AUTH,
    404: NOT_FOUND,
    409: INVALID,
    422: INVALID,
    429: LIMITED,
}
DEFAULT_URL, DEFAULT_CONTROLPLANE_URL = "http://127.0.0.1:8080", "http://127.0.0.1:8081"
TERMINAL = {"succeeded", "failed", "cancelled"}
PICOUSD_PER_USD = Decimal(10**12)
CHUNK = 256 * 1024


class CliError(Exception):
    """A failure to report on stderr with its exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.message, self.code = message, code


# --- HTTP -------------------------------------------------------------------------------
class Api:
    """The two public APIs, with the tenant's key."""

    def __init__(self, args: argparse.Namespace) -> None:
        key = args.api_key or os.environ.get("LORAFAAS_API_KEY")
        if not key:
            raise CliError("no API key: pass --api-key or set LORAFAAS_API_KEY", USAGE)
        headers = {"Authorization": f"Bearer {key}", "User-Agent": "lorafaas-cli"}
        timeout = httpx.Timeout(args.timeout, connect=10.0)
        gateway = args.url or os.environ.get("LORAFAAS_URL") or DEFAULT_URL
        cp = args.controlplane_url or os.environ.get("LORAFAAS_CONTROLPLANE_URL") or DEFAULT_CONTROLPLANE_URL
        self.gateway = httpx.Client(base_url=gateway, headers=headers, timeout=timeout)
        self.cp = httpx.Client(base_url=cp, headers=headers, timeout=timeout)

    def call(self, client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise CliError(f"cannot reach {client.base_url}: {e}", UNREACHABLE) from e
        check(response)
        return response

    def close(self) -> None:
        self.gateway.close()
        self.cp.close()


def check(response: httpx.Response) -> None:
    """Raise a ``CliError`` with the API's message (and the file and field it names) for an error status."""
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        error = {}
    message = error.get("message") or response.text or response.reason_phrase
    where = [f"{k}: {error[k]}" for k in ("file", "tensor", "field", "param") if error.get(k)]
    detail = f" ({'; '.join(where)})" if where else ""
    raise CliError(f"{message}{detail} [HTTP {response.status_code}]", EXIT_OF_STATUS.get(response.status_code, FAILED))


def usd(picousd: int) -> str:
    """Exact decimal dollars of an integer pico-dollar amount, as the API writes them."""
    return str(Decimal(picousd) / PICOUSD_PER_USD)


def secret_text(who: str, secret: str) -> str:
    """A new key as the CLI prints it: ``who`` is ``key_id=...`` or ``tenant_id=...``."""
    return f"{who}\napi_key={secret}\n(the key is shown only once)"


def emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2) if args.json else text(data))


# --- functions --------------------------------------------------------------------------
class MultipartUpload:
    """A multipart/form-data body streamed from disk, reporting its progress to a rich bar."""

    def __init__(self, fields: dict[str, str], files: list[Path]) -> None:
        self.boundary = f"lorafaas-{secrets.token_hex(12)}"
        self.fields, self.files = fields, files
        self.on_bytes: Callable[[int], None] = lambda n: None

    def _head(self, name: str, filename: str | None = None) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "\r\nContent-Type: application/octet-stream" if filename else ""
        return f"--{self.boundary}\r\nContent-Disposition: {disposition}{kind}\r\n\r\n".encode()

    def _parts(self) -> list[bytes | Path]:
        parts: list[bytes | Path] = []
        for name, value in self.fields.items():
            parts += [self._head(name), value.encode(), b"\r\n"]
        for path in self.files:
            parts += [self._head("files", path.name), path, b"\r\n"]
        parts.append(f"--{self.boundary}--\r\n".encode())
        return parts

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in self._parts())

    def __iter__(self) -> Iterator[bytes]:
        for part in self._parts():
            if isinstance(part, bytes):
                yield part
                continue
            with part.open("rb") as f:
                while chunk := f.read(CHUNK):
                    self.on_bytes(len(chunk))
                    yield chunk


def _function_line(f: dict) -> str:
    return (
        f"{f['name']:28} v{f['version']:<3} rank {f['rank']:<4} {f['backbone']:12} "
        f"in ${usd(f['price_input_micros_per_1m'] * 10**6)}/1M  out ${usd(f['price_output_micros_per_1m'] * 10**6)}/1M"
    )


def functions_create(api: Api, args: argparse.Namespace) -> None:
    """Upload a PEFT ``save_pretrained`` folder as a new function (or a new version of it)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    folder = Path(args.adapter)
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder (pass the folder PEFT's save_pretrained wrote)", USAGE)
    try:
        files = adapter_files(folder)
    except InvalidArtifact as e:
        raise CliError(f"{e.message} (file: {e.details.get('file')})", INVALID) from e
    try:
        json.loads((folder / "adapter_config.json").read_text())
    except ValueError as e:
        raise CliError(f"adapter_config.json is not valid JSON: {e} (file: adapter_config.json)", INVALID) from e
    prices = (args.price_in, args.price_out)
    admin_token = args.admin_token or os.environ.get("LORAFAAS_ADMIN_TOKEN")
    if any(p is not None for p in prices) and not admin_token:
        raise CliError(
            "prices are the operator's: --price-in/--price-out need --admin-token or LORAFAAS_ADMIN_TOKEN", USAGE
        )
    body = MultipartUpload({"name": args.name, "backbone": args.backbone}, files)
    total = len(body)
    columns = (TextColumn("uploading {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    quiet = args.json or not sys.stderr.isatty()
    with Progress(*columns, transient=True, disable=quiet, console=_stderr_console()) as bar:
        task = bar.add_task(folder.name, total=total)
        body.on_bytes = lambda n: bar.advance(task, n)
        response = api.call(
            api.cp,
            "POST",
            "/v1/functions",
            content=iter(body),
            headers={"Content-Type": body.content_type, "Content-Length": str(total)},
        )
    function = response.json()
    if any(p is not None for p in prices):
        patch = {
            k: v for k, v in zip(("price_input_micros_per_1m", "price_output_micros_per_1m"), prices) if v is not None
        }
        response = api.call(
            api.cp,
            "PATCH",
            f"/admin/functions/{function['id']}",
            json=patch,
            headers={"Authorization": f"Bearer {admin_token}"},
        )
        function = response.json()
    emit(args, function, lambda f: f"created {_function_line(f)}\nsha256 {f['sha256']}")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def functions_list(api: Api, args: argparse.Namespace) -> None:
    data = api.call(api.cp, "GET", "/v1/functions").json()
    emit(args, data, lambda d: "\n".join(_function_line(f) for f in d["data"]) or "no functions")


def functions_show(api: Api, args: argparse.Namespace) -> None:
    data = api.call(api.cp, "GET", f"/v1/functions/{args.name}").json()
    emit(args, data, lambda f: f"{_function_line(f)}\nid {f['id']}\nsha256 {f['sha256']}\nmax_tokens {f['max_tokens']}")


def functions_versions(api: Api, args: argparse.Namespace) -> None:
    data = api.call(api.cp, "GET", f"/v1/functions/{args.name}/versions").json()

    def text(d: dict) -> str:
        return "\n".join(
            f"v{v['version']:<3} rank {v['rank']:<4} {v['size_bytes']:>10} B  {v['sha256'][:16]}  "
            f"{'serving' if v['serving'] else ''}"
            for v in d["data"]
        )

    emit(args, data, text)


def functions_rollback(api: Api, args: argparse.Namespace) -> None:
    body = {"version": args.version} if args.version is not None else None
    data = api.call(api.cp, "POST", f"/v1/functions/{args.name}/rollback", json=body).json()
    emit(args, data, lambda f: f"{f['name']} now serves v{f['version']}")


# --- invocations and jobs ---------------------------------------------------------------
def _summary(d: dict) -> str:
    """``[state, N in / M out, id ID]``: the line after a result (the stream test reads the id from it)."""
    usage = d.get("usage") or {}
    tokens = f"{usage.get('prompt_tokens', 0)} in / {usage.get('completion_tokens', 0)} out"
    return f"[{d.get('state')}, {tokens}, id {d.get('id')}]"


def _result_text(d: dict) -> str:
    tail = "\n" + _summary(d)
    if d.get("error"):
        tail += f"\nerror: {d['error']}"
    return (d.get("text") or "") + tail


def invoke(api: Api, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"prompt": args.prompt, "max_tokens": args.max_tokens}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    path = f"/v1/functions/{args.name}/invoke"
    if args.stream:
        return _stream(api, args, {**body, "mode": "stream"}, path)
    if args.async_:
        job = api.call(api.gateway, "POST", path, json={**body, "mode": "async"}).json()
        if not args.wait:
            emit(args, job, lambda d: d["id"])
            return None
        return _finish(args, _wait(api, job["id"], args.timeout))
    return _finish(args, api.call(api.gateway, "POST", path, json=body).json())


def _finish(args: argparse.Namespace, result: dict) -> None:
    emit(args, result, _result_text)
    if result.get("state") == "failed":
        raise CliError(f"invocation {result['id']} failed: {result.get('error')}", FAILED)


def _stream(api: Api, args: argparse.Namespace, body: dict, path: str) -> None:
    """Print tokens as the server-sent events arrive; the ``done`` event carries the usage."""
    try:
        with api.gateway.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                check(response)
            event, done = "message", None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:].strip())
                    if event == "token" and not args.json:
                        sys.stdout.write(data.get("text", ""))
                        sys.stdout.flush()
                    elif event == "done":
                        done = data
                    elif event == "error":
                        error = data.get("error", data)
                        raise CliError(f"the stream failed: {error.get('message', error)}", FAILED)
    except httpx.TransportError as e:
        raise CliError(f"cannot reach {api.gateway.base_url}: {e}", UNREACHABLE) from e
    if done is None:
        raise CliError("the stream ended without its done event", FAILED)
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        print("\n" + _summary(done))


def _wait(api: Api, invocation_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        status = api.call(api.gateway, "GET", f"/v1/invocations/{invocation_id}").json()
        if status["state"] in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise CliError(f"job {invocation_id} is still {status['state']} after {timeout_s:g}s", FAILED)
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


def jobs_show(api: Api, args: argparse.Namespace) -> None:
    status = api.call(api.gateway, "GET", f"/v1/invocations/{args.id}").json()
    emit(args, status, _result_text)


def jobs_cancel(api: Api, args: argparse.Namespace) -> None:
    status = api.call(api.gateway, "POST", f"/v1/invocations/{args.id}/cancel").json()
    emit(args, status, lambda d: f"cancel requested for {d['id']} (now {d['state']})")


# --- usage and bills --------------------------------------------------------------------
RELATIVE = re.compile(r"^(\d+)([hd])$")


def parse_since(value: str | None, now: datetime) -> datetime:
    """``24h``, ``7d``, a date or an ISO time (UTC unless it names a zone); default: this month's start."""
    if not value:
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    match = RELATIVE.match(value)
    if match:
        n, unit = int(match.group(1)), match.group(2)
        return now - (timedelta(hours=n) if unit == "h" else timedelta(days=n))
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as e:
        raise CliError(f"--since: not 24h, 7d, 2026-11-01 or 2026-11-01T12:00, got {value!r}", USAGE) from e
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def usage(api: Api, args: argparse.Namespace) -> None:
    """Usage from /v1/usage, summed per function, per hour or per day (exact integer pico-dollars)."""
    now = datetime.now(UTC)
    since = parse_since(args.since, now)
    width = "1h" if args.by == "hour" else "1d"
    params = {
        "start_time": int(since.timestamp()),
        "end_time": int(now.timestamp()) + 1,
        "bucket_width": width,
        "group_by": "function",
    }
    page = api.call(api.cp, "GET", "/v1/usage", params=params).json()
    rows: dict[str, dict[str, int]] = {}
    for bucket in page["data"]:
        for r in bucket["results"]:
            if args.by == "function":
                key = r["function"]
            else:
                key = datetime.fromtimestamp(bucket["start_time"], UTC).strftime(
                    "%Y-%m-%d %H:00" if width == "1h" else "%Y-%m-%d"
                )
            row = rows.setdefault(key, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "amount_picousd": 0})
            row["requests"] += r["num_model_requests"]
            row["input_tokens"] += r["input_tokens"]
            row["output_tokens"] += r["output_tokens"]
            row["amount_picousd"] += r["amount_picousd"]
    total = sum(r["amount_picousd"] for r in rows.values())
    data = {
        "by": args.by,
        "since": since.isoformat(),
        "rows": [{args.by: k, **v, "amount_usd": usd(v["amount_picousd"])} for k, v in sorted(rows.items())],
        "total_picousd": total,
        "total_usd": usd(total),
    }

    def text(d: dict) -> str:
        lines = [f"{args.by:28} {'requests':>9} {'tokens in':>10} {'tokens out':>10}  amount"]
        lines += [
            f"{r[args.by]:28} {r['requests']:>9} {r['input_tokens']:>10} {r['output_tokens']:>10}  ${r['amount_usd']}"
            for r in d["rows"]
        ]
        return "\n".join([*lines, f"{'total':28} {'':>9} {'':>10} {'':>10}  ${d['total_usd']}"])

    emit(args, data, text)


def bills_show(api: Api, args: argparse.Namespace) -> None:
    b = api.call(api.cp, "GET", f"/v1/bills/{args.period}").json()
    if args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(wire.BILL_CSV_COLUMNS)
        for line in b["lines"]:
            w.writerow([b["period"], *(line[k] for k in wire.BILL_CSV_COLUMNS[1:-1]), line["amount_usd"]])
        w.writerow([b["period"], "total", "", "", "", "", b["total_picousd"], b["total_usd"]])
        return

    def text(d: dict) -> str:
        lines = [f"bill {d['period']}"]
        lines += [
            f"{x['function']:28} {x['invocations']:>8} inv {x['input_tokens']:>10} in {x['output_tokens']:>10} out"
            f"  ${x['amount_usd']}"
            for x in d["lines"]
        ]
        return "\n".join([*lines, f"{'total':28} ${d['total_usd']}"])

    emit(args, b, text)


# --- API keys ---------------------------------------------------------------------------
def keys_list(api: Api, args: argparse.Namespace) -> None:
    page = api.call(api.cp, "GET", "/v1/keys").json()

    def state(k: dict) -> str:
        if k["revoked_at"]:
            return "revoked"
        return f"expires {k['expires_at']}" if k["expires_at"] else "active"

    def text(d: dict) -> str:
        lines = [f"{'id':36} {'name':16} {'prefix':10} {'scopes':40} state"]
        lines += [
            f"{k['id']:36} {k['name']:16} {k['prefix']:10} {','.join(k['scopes']):40} {state(k)}" for k in d["data"]
        ]
        return "\n".join(lines)

    emit(args, page, text)


def keys_create(api: Api, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"name": args.name}
    if args.scope:
        body["scopes"] = args.scope
    if args.expires_in_days is not None:
        if args.expires_in_days <= 0:
            raise CliError("--expires-in-days: a positive number of days", USAGE)
        body["expires_in_s"] = args.expires_in_days * 86400.0
    key = api.call(api.cp, "POST", "/v1/keys", json=body).json()
    emit(args, key, lambda k: secret_text(f"key_id={k['id']}", k["secret"]))


def keys_revoke(api: Api, args: argparse.Namespace) -> None:
    key = api.call(api.cp, "DELETE", f"/v1/keys/{args.id}").json()
    emit(args, key, lambda k: f"revoked {k['id']} ({k['prefix']}...)")


# --- the parser -------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--url", help=f"the gateway (default: $LORAFAAS_URL or {DEFAULT_URL})")
    g.add_argument(
        "--controlplane-url",
        help=f"the control plane (default: $LORAFAAS_CONTROLPLANE_URL or {DEFAULT_CONTROLPLANE_URL})",
    )
    g.add_argument("--api-key", help="the tenant's API key (default: $LORAFAAS_API_KEY)")
    g.add_argument("--json", action="store_true", help="print the API's JSON (for scripts)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for an answer (default 120)")
    return common


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the tenant's commands beside the admin ones."""
    common = _common()

    def leaf(parent: argparse._SubParsersAction, name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=None, tenant_command=handler)
        return p

    functions = sub.add_parser("functions", help="your functions: create, list, show, versions, rollback")
    fsub = functions.add_subparsers(dest="functions", required=True)
    p = leaf(fsub, "create", functions_create, "upload a PEFT save_pretrained folder as a function (or a new version)")
    p.add_argument("name")
    p.add_argument("--adapter", required=True, help="the folder PEFT's save_pretrained wrote")
    p.add_argument("--backbone", required=True, help="the base model it was trained on (a registered backbone)")
    p.add_argument(
        "--price-in", type=int, help="micro-dollars per 1M input tokens (operator only: needs --admin-token)"
    )
    p.add_argument("--price-out", type=int, help="micro-dollars per 1M output tokens (operator only)")
    p.add_argument("--admin-token", help="the operator token, to set prices (default: $LORAFAAS_ADMIN_TOKEN)")
    leaf(fsub, "list", functions_list, "list your functions")
    p = leaf(fsub, "show", functions_show, "one function and the version it serves")
    p.add_argument("name")
    p = leaf(fsub, "versions", functions_versions, "every stored version of a function")
    p.add_argument("name")
    p = leaf(fsub, "rollback", functions_rollback, "serve an older version (default: the previous one)")
    p.add_argument("name")
    p.add_argument("--version", type=int)

    p = leaf(sub, "invoke", invoke, "invoke a function: wait for the text, stream it, or submit a job")
    p.add_argument("name")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    mode.add_argument("--async", dest="async_", action="store_true", help="submit a job and print its id")
    p.add_argument("--wait", action="store_true", help="with --async: wait for the job and print its result")

    jobs = sub.add_parser("jobs", help="async jobs: show, cancel").add_subparsers(dest="jobs", required=True)
    p = leaf(jobs, "show", jobs_show, "a job's state, result and usage")
    p.add_argument("id")
    p = leaf(jobs, "cancel", jobs_cancel, "cancel a queued or running job")
    p.add_argument("id")

    p = leaf(sub, "usage", usage, "your usage per function, hour or day")
    p.add_argument("--by", choices=["function", "hour", "day"], default="function")
    p.add_argument("--since", help="24h, 7d, 2026-11-01 or an ISO time (default: the start of this month)")

    keys = sub.add_parser("keys", help="your API keys: list, create, revoke").add_subparsers(dest="keys", required=True)
    leaf(keys, "list", keys_list, "your keys (never their secrets)")
    p = leaf(keys, "create", keys_create, "another key; its secret is printed once")
    p.add_argument("--name", default="", help="a label for the key")
    p.add_argument(
        "--scope", action="append", choices=ALL_SCOPES, help="repeat for several (default: the scopes of your key)"
    )
    p.add_argument("--expires-in-days", type=float, help="default: never")
    p = leaf(keys, "revoke", keys_revoke, "revoke a key at once (the one you use too)")
    p.add_argument("id")

    bills = sub.add_parser("bills", help="your bills").add_subparsers(dest="bills", required=True)
    p = leaf(bills, "show", bills_show, "the bill of a month")
    p.add_argument(
        "period", nargs="?", default=datetime.now(UTC).strftime("%Y-%m"), help="YYYY-MM (default: this month)"
    )
    p.add_argument("--csv", action="store_true", help="print CSV")


def run(args: argparse.Namespace) -> int:
    """Run a tenant command; errors go to stderr and pick the exit code."""
    if getattr(args, "wait", False) and not getattr(args, "async_", False):
        print("lorafaas: error: --wait goes with --async", file=sys.stderr)
        return USAGE
    try:
        api = Api(args)
    except CliError as e:
        print(f"lorafaas: error: {e.message}", file=sys.stderr)
        return e.code
    try:
        args.tenant_command(api, args)
    except CliError as e:
        sys.stdout.flush()
        print(f"lorafaas: error: {e.message}", file=sys.stderr)
        return e.code
    finally:
        api.close()
    return OK
