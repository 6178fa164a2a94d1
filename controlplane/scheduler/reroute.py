"""Moving a gone worker's queue: nothing accepted waits on the subject of a worker that is gone.

A dead worker (silent past ``dead_after_s``) or a drained one (it stopped pulling) may leave
invocations on its own subject: queued ones, and ones it pulled but never acked. The mover
deletes the worker's durable consumer (its un-acked messages become deliverable again), reads
the subject with a consumer of its own, republishes each invocation to the backbone's shared
subject, and acks the original only after the copy is stored. The copy's ``Nats-Msg-Id`` is
derived from the original's stream sequence, so a move retried after a crash is deduplicated;
a run that happens twice anyway (a worker that was only partitioned) is settled once, because
results and usage carry per-invocation message ids and the ledger keys usage by invocation.

The subject is swept for ``reroute_ttl_s`` after the worker went, for gateways still routing on
an older table; a worker that comes back under the same id gets its subject back.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from lorafaas.names import Names
from lorafaas.streams import republish_to_shared

log = logging.getLogger(__name__)

BATCH = 64
FETCH_TIMEOUT_S = 0.05


@dataclass
class Orphan:
    worker_id: str
    backbone: str
    since_s: float
    reason: str  # "dead" | "drained"
    sub: JetStreamContext.PullSubscription | None = None


@dataclass
class Rerouter:
    js: JetStreamContext
    names: Names
    ack_wait_s: float
    orphans: dict[str, Orphan] = field(default_factory=dict)
    moved: int = 0

    def adopt(self, worker_id: str, backbone: str, now_s: float, reason: str) -> bool:
        """Start sweeping a gone worker's subject; False if already swept."""
        if worker_id in self.orphans:
            return False
        self.orphans[worker_id] = Orphan(worker_id, backbone, now_s, reason)
        return True

    async def release(self, worker_id: str) -> None:
        """Stop sweeping (the worker is back, or the grace period is over): its consumer goes."""
        orphan = self.orphans.pop(worker_id, None)
        if orphan is None:
            return
        if orphan.sub is not None:
            with contextlib.suppress(Exception):
                await orphan.sub.unsubscribe()
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(self.names.invocations_stream, self.names.reroute_consumer(worker_id))

    async def sweep(self, now_s: float, ttl_s: float) -> dict[str, int]:
        """Move what waits on every swept subject; returns the count moved per worker."""
        moved: dict[str, int] = {}
        for orphan in list(self.orphans.values()):
            if now_s - orphan.since_s > ttl_s:
                await self.release(orphan.worker_id)
                continue
            try:
                n = await self._move(orphan)
            except Exception as e:  # NATS away: the next round tries again, nothing was acked
                log.warning("re-routing the queue of %s failed: %r", orphan.worker_id, e)
                continue
            if n:
                moved[orphan.worker_id] = n
                self.moved += n
                log.info("re-routed %d invocations of %s worker %s", n, orphan.reason, orphan.worker_id)
        return moved

    async def _subscribe(self, orphan: Orphan) -> JetStreamContext.PullSubscription:
        if orphan.sub is None:
            stream = self.names.invocations_stream
            # Its consumer goes first: a work queue lets only one consumer read a subject, and
            # deleting it makes its pulled-but-unacked messages deliverable to ours.
            with contextlib.suppress(NotFoundError):
                await self.js.delete_consumer(stream, self.names.worker_own_consumer(orphan.worker_id))
            subject = self.names.invoke_worker_subject(orphan.backbone, orphan.worker_id)
            config = ConsumerConfig(
                durable_name=self.names.reroute_consumer(orphan.worker_id),
                filter_subject=subject,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait_s,
                deliver_policy=DeliverPolicy.ALL,
            )
            orphan.sub = await self.js.pull_subscribe(
                subject, durable=config.durable_name, stream=stream, config=config
            )
        return orphan.sub

    async def _move(self, orphan: Orphan) -> int:
        sub = await self._subscribe(orphan)
        count = 0
        while True:
            try:
                msgs = await sub.fetch(batch=BATCH, timeout=FETCH_TIMEOUT_S)
            except (TimeoutError, NatsTimeout):
                return count
            for msg in msgs:
                await republish_to_shared(self.js, self.names, orphan.backbone, msg, orphan.worker_id)
                count += 1
