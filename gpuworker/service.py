"""The worker's NATS side: pull invocations, run them on the engine, publish, then ack.

At-least-once: a message is acked only after its result (which carries what to bill) is
stored in JetStream. A permanent failure (bad adapter, bad input, a request the engine failed
alone) is answered with a failed result and ``term``; an infrastructure failure is ``nak``-ed
with a delay, until the last delivery, which is answered as failed so no accepted invocation
goes unanswered. Every message held here gets ``in_progress`` every quarter AckWait, so a live
worker never loses one to AckWait while a dead worker's messages are redelivered within one.

If the engine loop stops (``EngineFailed``) or makes no progress for
``WorkerSettings.engine_stall_exit_s``, the worker stops pulling, naks what it holds, and its
process exits non-zero; meanwhile its heartbeats say so, and the control plane stops counting
it as alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from gpuworker.adapters import AdapterEvicted, AdapterManager, DeviceLoad, adapter_key
from gpuworker.engine import EngineRequest, PoolFullError, StepOutput
from gpuworker.peer import PeerFetcher, PeerServer
from gpuworker.runner import EngineFailed, EngineRunner
from gpuworker.subscriptions import Intake, Lifecycle
from lorafaas import wire
from lorafaas.errors import (
    ArtifactIntegrityError,
    InvalidArtifact,
    InvalidInput,
    InvocationFailed,
    LorafaasError,
    NotFound,
)
from lorafaas.names import (
    DEAD_REASON_HEADER,
    MSG_ID_HEADER,
    Names,
    dead_message_msg_id,
    dead_msg_id,
    result_msg_id,
    started_msg_id,
)
from lorafaas.settings import NatsSettings, WorkerSettings

log = logging.getLogger(__name__)

POOL_RETRY_S = 0.02
PERMANENT = (InvalidArtifact, ArtifactIntegrityError, InvalidInput, NotFound, InvocationFailed)
# Postgres text cannot hold U+0000: the worker replaces it in what it streams and returns, so
# the caller, the stored result and the bill all see the same text.
NUL, REPLACEMENT = "\x00", "\ufffd"


def storable(text: str) -> str:
    """Generated text as it is streamed, returned and stored: U+0000 becomes U+FFFD."""
    return text.replace(NUL, REPLACEMENT) if NUL in text else text


@dataclass
class Running:
    """One invocation in flight on this worker."""

    invocation: wire.Invocation
    msg: Msg
    started_at: datetime
    load_s: float = 0.0
    load_tier: str = ""  # where the adapter was when this request needed it
    load_moves_s: dict[str, float] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)
    device_s: float = 0.0
    prefill_s: float = 0.0
    generated: int = 0
    first_token_at: datetime | None = None
    # Set by a CancelRequest; checked again after submit, so a cancel racing the start still aborts.
    cancelled: bool = False


class WorkerService:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        names: Names,
        nats_settings: NatsSettings,
        settings: WorkerSettings,
        runner: EngineRunner,
        adapters: AdapterManager,
        tokenizer,
        max_context: int,
        device: str,
    ) -> None:
        self.nc, self.js, self.names, self.nats_settings, self.settings = nc, js, names, nats_settings, settings
        # The engine's context limit (the backbone's own); an invocation names its record's.
        self.runner, self.adapters, self.tokenizer, self.max_context, self.device = (
            runner,
            adapters,
            tokenizer,
            max_context,
            device,
        )
        self.inflight: dict[str, Running] = {}
        self.lifecycle = Lifecycle()
        self.draining = self.lifecycle.draining
        self.intake = Intake(
            js, names, nats_settings, settings, self.lifecycle, lambda: len(self.inflight), self._on_pulled
        )
        self.peers = PeerServer(nc, names, settings.worker_id, adapters.holdings)
        self.peer_fetcher = PeerFetcher(nc, names, settings.peer_fetch_timeout_s, settings.peer_fetch_max_bytes)
        if settings.peer_fetch:
            adapters.peer_fetch = self.peer_fetcher.fetch
        self.started_at = datetime.now(UTC)
        self._tasks: set[asyncio.Task] = set()

    # --- lifecycle -------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until drained: pull loop, command listener, reports and heartbeats."""
        commands = await self.nc.subscribe(
            self.names.worker_command_subject(self.settings.worker_id), cb=self._on_command
        )
        cancels = await self.nc.subscribe(self.names.cancel_wildcard, cb=self._on_cancel)
        background = [
            asyncio.create_task(self._report_loop(), name="reports"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeats"),
            asyncio.create_task(self._watch_engine(), name="engine-watchdog"),
            asyncio.create_task(self.peers.run(), name="peer-server"),
        ]
        try:
            await self.intake.run()
            while self.inflight and self._tasks:  # drain: let running invocations finish
                await asyncio.wait(set(self._tasks), timeout=0.05)
        finally:
            await commands.unsubscribe()
            await cancels.unsubscribe()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    def drain(self) -> None:
        self.lifecycle.drain()

    async def _watch_engine(self) -> None:
        """Stop taking work once the engine has failed, or has held work without a step for too long."""
        limit = self.settings.engine_stall_exit_s
        failed = asyncio.create_task(self.runner.wait_failed())
        try:
            while not failed.done():
                await asyncio.wait({failed}, timeout=min(1.0, limit / 4))
                stalled = self.runner.stalled_s()
                if not failed.done() and stalled > limit:
                    self.runner.declare_stuck(stalled)
        finally:
            failed.cancel()
        log.critical("worker %s stops taking work: %s", self.settings.worker_id, self.runner.failure)
        self.drain()

    def _on_pulled(self, msg: Msg) -> None:
        self._spawn(self.handle(msg))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one invocation: decode / execute / settle ----------------------------------------
    async def handle(self, msg: Msg) -> None:
        try:
            invocation = wire.Invocation.decode(msg.data)
        except ValidationError as e:
            log.error("terminating undecodable invocation message: %s", e)
            await msg.term()
            return
        except wire.UnknownSchemaVersion as e:
            await self._refuse_unknown_schema(msg, e)
            return
        if invocation.invocation_id in self.inflight:  # redelivered while still running here
            await msg.in_progress()
            return
        running = Running(invocation, msg, started_at=datetime.now(UTC))
        self.inflight[invocation.invocation_id] = running
        if await self._cancel_requested(invocation.invocation_id):
            await self._skip_cancelled(running)
            return
        heartbeat = asyncio.create_task(self._keep_alive(msg))
        try:
            await self._execute(running)
        except PERMANENT as e:
            await self._settle_failed(running, e)
        except Exception as e:  # infrastructure (or this engine failed): retry elsewhere or later
            await self._retry_or_fail(running, e)
        finally:
            heartbeat.cancel()
            self.inflight.pop(invocation.invocation_id, None)

    async def _refuse_unknown_schema(self, msg: Msg, error: wire.UnknownSchemaVersion) -> None:
        """Another version's invocation: never guessed at. Left for a worker that reads it, then dead-lettered."""
        delivered = msg.metadata.num_delivered
        log.error("invocation message of an unknown schema (delivery %d): %s", delivered, error)
        if delivered < self.nats_settings.max_deliver:
            await msg.nak(delay=5.0)
            return
        await self.js.publish(
            self.names.dead_letter_subject(self.settings.backbone),
            msg.data,
            headers={
                MSG_ID_HEADER: dead_message_msg_id(self.names.invocations_stream, msg.metadata.sequence.stream),
                DEAD_REASON_HEADER: str(error),
            },
        )
        await msg.term()

    async def _execute(self, running: Running) -> None:
        inv = running.invocation
        await self._publish(
            self.names.started_subject(inv.invocation_id),
            wire.Started(invocation_id=inv.invocation_id, worker_id=self.settings.worker_id),
            started_msg_id(inv.invocation_id),
        )
        prompt_ids = self._tokenize(inv)
        request = EngineRequest(
            request_id=inv.invocation_id,
            adapter_id=adapter_key(inv.adapter),
            prompt_ids=prompt_ids,
            max_tokens=inv.sampling.max_tokens,
            temperature=inv.sampling.temperature,
            top_p=inv.sampling.top_p,
            seed=inv.sampling.seed,
            stop=list(inv.sampling.stop),
        )
        outputs, running.load_s, load = await self._admit(inv.adapter, request)
        running.load_tier, running.load_moves_s = load.tier.value, load.moves_s
        if running.cancelled:  # the cancel arrived while the adapter loaded
            await self.runner.abort(inv.invocation_id)
        while True:
            out = await outputs.get()
            if isinstance(out, EngineFailed):
                raise out
            if out.error is not None:  # the engine failed this request alone: permanent, not retried
                raise InvocationFailed(out.error)
            await self._on_output(running, out)
            if out.finished:
                await self._settle_succeeded(running, out)
                return

    async def _admit(
        self, ref: wire.AdapterRef, request: EngineRequest
    ) -> tuple[asyncio.Queue[StepOutput | EngineFailed], float, DeviceLoad]:
        """Bring the request's adapter to the device and queue the request, in one engine call.

        Returns the request's output queue, the seconds a cold start added (fetching the
        adapter to host memory, copying it to the device, and waiting for pool pages when every
        page is pinned by running requests, a burst of many adapters, instead of failing) and
        the load itself (the tier the adapter came from and each move's seconds).
        """
        deadline = time.monotonic() + self.settings.pool_wait_s
        started = time.perf_counter()
        waited_s = 0.0  # failed attempts and sleeps while every page was pinned
        while True:
            load = await self.adapters.stage(ref)
            try:
                outputs = await self.runner.submit(request, prepare=load)
                return outputs, waited_s + load.fetch_s + load.copy_s, load
            except AdapterEvicted:
                continue  # staged as resident, evicted since: stage it again from the host tier
            except PoolFullError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(POOL_RETRY_S)
                waited_s = time.perf_counter() - started

    def _tokenize(self, inv: wire.Invocation) -> list[int]:
        """The prompt's token ids, held to the backbone record's context limit (the engine holds its own)."""
        ids = self.tokenizer(inv.prompt, add_special_tokens=True)["input_ids"]
        limit = inv.max_context or self.max_context
        if len(ids) + inv.sampling.max_tokens > limit:
            raise InvalidInput(
                f"prompt of {len(ids)} tokens plus max_tokens={inv.sampling.max_tokens} exceeds the backbone's "
                f"context of {limit} tokens",
                param="prompt",
                limit=limit,
            )
        return ids

    async def _on_output(self, running: Running, out: StepOutput) -> None:
        running.device_s += out.device_s
        if out.token_id < 0:  # an abort marker, not a generated token
            return
        running.generated += 1
        if running.first_token_at is None:
            running.first_token_at = datetime.now(UTC)
            running.prefill_s = out.prefill_s
        if out.text:
            text = storable(out.text)
            running.text.append(text)
            if running.invocation.mode == wire.InvocationMode.STREAM:
                chunk = wire.TokenChunk(invocation_id=out.request_id, index=out.index, text=text)
                await self.nc.publish(self.names.token_subject(out.request_id), chunk.encode())

    def _timings(self, running: Running, finished: datetime) -> wire.Timings:
        accepted = running.invocation.accepted_at
        first = running.first_token_at or finished
        return wire.Timings(
            queue_wait_s=max(0.0, (running.started_at - accepted).total_seconds()),
            load_s=running.load_s,
            load_tier=running.load_tier,
            load_moves_s=running.load_moves_s,
            prefill_s=running.prefill_s,
            ttft_s=max(0.0, (first - accepted).total_seconds()),
            total_s=max(0.0, (finished - accepted).total_seconds()),
        )

    async def _settle_succeeded(self, running: Running, last: StepOutput) -> None:
        inv = running.invocation
        finished = datetime.now(UTC)
        completion_tokens = running.generated
        status = wire.ResultStatus.CANCELLED if last.finish_reason == "abort" else wire.ResultStatus.SUCCEEDED
        result = wire.InvocationResult(
            invocation_id=inv.invocation_id,
            status=status,
            text="".join(running.text),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=completion_tokens,
            worker_id=self.settings.worker_id,
            timings=self._timings(running, finished),
            first_token_at=running.first_token_at,
            finished_at=finished,
            # One message carries the result and what to bill: the control plane records the
            # usage from the result it keeps, so a re-run can never bill other tokens.
            billing=wire.Billing(
                tenant_id=inv.tenant_id,
                function_id=inv.adapter.function_id,
                device_ns=int(running.device_s * 1e9),
            ),
        )
        await self._publish_outcome(running, result)
        await running.msg.ack_sync()

    async def _settle_failed(self, running: Running, error: LorafaasError) -> None:
        inv = running.invocation
        log.warning("invocation %s failed permanently: %s", inv.invocation_id, error.message)
        finished = datetime.now(UTC)
        result = wire.InvocationResult(
            invocation_id=inv.invocation_id,
            status=wire.ResultStatus.FAILED,
            error=error.message,
            error_code=error.code,
            worker_id=self.settings.worker_id,
            timings=self._timings(running, finished),
            finished_at=finished,
        )
        await self._publish_outcome(running, result)
        await running.msg.term()

    async def _retry_or_fail(self, running: Running, error: Exception) -> None:
        delivered = running.msg.metadata.num_delivered
        if delivered >= self.nats_settings.max_deliver:
            log.error("invocation %s failed on its last delivery: %r", running.invocation.invocation_id, error)
            inv = running.invocation
            reason = f"worker error after {delivered} attempts: {error}"
            await self.js.publish(
                self.names.dead_letter_subject(inv.backbone),
                running.msg.data,
                headers={MSG_ID_HEADER: dead_msg_id(inv.invocation_id), DEAD_REASON_HEADER: reason},
            )
            await self._settle_failed(running, LorafaasError(reason))
            return
        log.warning(
            "invocation %s hit %r; redelivering (attempt %d)", running.invocation.invocation_id, error, delivered
        )
        await running.msg.nak(delay=min(5.0, 0.5 * 2**delivered))

    async def _publish_outcome(self, running: Running, result: wire.InvocationResult) -> None:
        inv_id = running.invocation.invocation_id
        await self._publish(self.names.result_subject(inv_id), result, result_msg_id(inv_id))

    async def _publish(self, subject: str, message: wire.WireMessage, msg_id: str) -> None:
        await self.js.publish(subject, message.encode(), headers={MSG_ID_HEADER: msg_id})

    # --- cancels ---------------------------------------------------------------------------
    async def _on_cancel(self, msg: Msg) -> None:
        """A cancel heard live: abort the invocation if it runs here (others ignore it)."""
        try:
            invocation_id = wire.CancelRequest.decode(msg.data).invocation_id
        except ValidationError:
            return
        running = self.inflight.get(invocation_id)
        if running is not None and not running.cancelled:
            running.cancelled = True
            self._spawn(self.runner.abort(invocation_id))

    async def _cancel_requested(self, invocation_id: str) -> bool:
        """Was it cancelled while queued? The marker stays in the cancels stream."""
        try:
            await self.js.get_last_msg(self.names.cancels_stream, self.names.cancel_subject(invocation_id))
            return True
        except NotFoundError:
            return False
        except Exception as e:  # a lookup failure must not lose the invocation: run it
            log.warning("cancel lookup for %s failed: %r", invocation_id, e)
            return False

    async def _skip_cancelled(self, running: Running) -> None:
        """Settle a cancelled-before-start invocation: nothing generated, nothing billed."""
        inv_id = running.invocation.invocation_id
        try:
            result = wire.InvocationResult(
                invocation_id=inv_id,
                status=wire.ResultStatus.CANCELLED,
                finish_reason="cancelled",
                worker_id=self.settings.worker_id,
            )
            await self._publish_outcome(running, result)  # same msg id as the gateway's: deduplicated
            await running.msg.ack_sync()
        finally:
            self.inflight.pop(inv_id, None)

    async def _keep_alive(self, msg: Msg) -> None:
        # Four beats per AckWait: a late or lost one never lets AckWait fire on a live worker,
        # while a dead worker's messages are redelivered within one AckWait of its death.
        interval = max(0.1, self.nats_settings.ack_wait_s / 4)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    # --- commands, reports, heartbeats -----------------------------------------------------
    async def _on_command(self, msg: Msg) -> None:
        try:
            command = wire.WorkerCommand.decode(msg.data)
        except ValidationError as e:
            log.error("ignoring malformed worker command: %s", e)
            return
        try:
            await self.execute_command(command)
            reply: dict[str, object] = {"ok": True}
        except Exception as e:  # a bad command must never take the worker down
            log.warning("command %s failed: %r", command.command, e)
            reply = {"ok": False, "error": str(e)}
        if msg.reply:
            await msg.respond(json.dumps(reply).encode())

    async def execute_command(self, command: wire.WorkerCommand) -> None:
        if command.command == wire.CommandKind.DRAIN:
            self.drain()  # the reply waits until nothing more is pulled: the rest of the queue can move
            await self.lifecycle.stopped_pulling.wait()
            return
        if command.command == wire.CommandKind.ACTIVATE:
            self.lifecycle.activate()
            return
        if command.adapter is None:
            raise InvalidInput(f"command {command.command} needs an adapter")
        if command.command == wire.CommandKind.PREFETCH:
            await self.prefetch(command.adapter)
        elif command.command == wire.CommandKind.OFFLOAD:
            await self.adapters.offload(command.adapter)
        elif command.command == wire.CommandKind.EVICT:
            await self.adapters.evict(command.adapter)

    async def prefetch(self, ref: wire.AdapterRef) -> None:
        """Move an adapter down every tier with no request waiting, then run a warm-up pass."""
        warmup = EngineRequest(
            request_id=f"warmup-{adapter_key(ref)}-{time.monotonic_ns()}",
            adapter_id=adapter_key(ref),
            prompt_ids=[self.tokenizer.bos_token_id or 0],
            max_tokens=1,
            ignore_eos=True,
        )
        outputs, _, _ = await self._admit(ref, warmup)
        finished = False
        while not finished:  # one token: the outputs of the warm-up are discarded
            out = await outputs.get()
            if isinstance(out, EngineFailed):
                raise out
            finished = out.finished

    def contention_report(self) -> wire.ContentionReport:
        """Built from the engine's published snapshot: the event loop never reads live engine state."""
        snapshot = self.runner.snapshot
        pool = snapshot.pool
        depth: dict[str, int] = {}
        rank_mix: dict[int, int] = {}
        for running in list(self.inflight.values()):
            fid, rank = running.invocation.adapter.function_id, running.invocation.adapter.rank
            depth[fid] = depth.get(fid, 0) + 1
            rank_mix[rank] = rank_mix.get(rank, 0) + 1
        stats = self.runner.stats
        return wire.ContentionReport(
            worker_id=self.settings.worker_id,
            backbone=self.settings.backbone,
            adapters=self.adapters.residency(),
            pool_pages_used=pool.pages_used,
            pool_pages_free=pool.pages_free,
            pool_utilisation=pool.utilisation,
            queue_depth=depth,
            running_batch=snapshot.running,
            tokens_per_s=stats.tokens_per_s(),
            step_latency_p50_s=stats.percentile(0.5),
            step_latency_p95_s=stats.percentile(0.95),
            host_cache_bytes=self.adapters.host_bytes(),
            state=self.lifecycle.state,
            pool_page_bytes=pool.page_bytes,
            rank_mix=rank_mix,
            adapter_loads=self.adapters.device_loads,
            peer_fetches=self.peer_fetcher.stats.fetches,
        )

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.report_interval_s)
            try:
                await self._report_once()
            except Exception:  # one bad report must not end the reports for the life of the process
                log.exception("contention report failed; the next one is due in %gs", self.settings.report_interval_s)

    async def _report_once(self) -> None:
        report = self.contention_report()
        with contextlib.suppress(Exception):
            await self.nc.publish(self.names.contention_subject, report.encode())
        if report.step_latency_p95_s > self.settings.step_latency_target_s and report.pool_pages_free == 0:
            await self.adapters.offload_coldest(count=1)

    async def _heartbeat_loop(self) -> None:
        beat = wire.WorkerHeartbeat(
            worker_id=self.settings.worker_id,
            backbone=self.settings.backbone,
            device=self.device,
            started_at=self.started_at,
        )
        while True:
            with contextlib.suppress(Exception):
                await self.nc.publish(self.names.heartbeat_subject, self.heartbeat(beat).encode())
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    def heartbeat(self, base: wire.WorkerHeartbeat) -> wire.WorkerHeartbeat:
        """This moment's heartbeat: the process is alive, and how the engine thread is doing."""
        failure = self.runner.failure
        return base.model_copy(
            update={
                "sent_at": datetime.now(UTC),
                "state": self.lifecycle.state,
                "engine_steps": self.runner.steps,
                "engine_stalled_s": self.runner.stalled_s(),
                "engine_failed": str(failure) if failure is not None else None,
            }
        )
