"""A worker without a model: pulls invocations, echoes the prompt as the (billed) result, acks.

It speaks the real wire protocol (same consumer, subjects, message ids), so the gateway,
JetStream and the control plane see exactly what a GPU worker would send.

Usage: python benchmarks/null_worker.py NATS_URL PREFIX BACKBONE
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import nats
from nats.errors import TimeoutError as NatsTimeout

from lorafaas import wire
from lorafaas.names import MSG_ID_HEADER, Names, result_msg_id
from lorafaas.settings import NatsSettings
from lorafaas.streams import ensure_streams, pull_invocations


async def answer(js, names: Names, msg) -> None:
    inv = wire.Invocation.decode(msg.data)
    now = datetime.now(UTC)
    tokens = max(1, len(inv.prompt.split()))
    result = wire.InvocationResult(
        invocation_id=inv.invocation_id,
        status=wire.ResultStatus.SUCCEEDED,
        text=inv.prompt,
        finish_reason="stop",
        prompt_tokens=tokens,
        completion_tokens=tokens,
        worker_id="null",
        first_token_at=now,
        finished_at=now,
        billing=wire.Billing(tenant_id=inv.tenant_id, function_id=inv.adapter.function_id),
    )
    await js.publish(
        names.result_subject(inv.invocation_id),
        result.encode(),
        headers={MSG_ID_HEADER: result_msg_id(inv.invocation_id)},
    )
    await msg.ack()


async def main(url: str, prefix: str, backbone: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    names = Names(prefix)
    await ensure_streams(js, names)
    sub = await pull_invocations(js, names, backbone, NatsSettings(url=url, prefix=prefix))
    print("ready", flush=True)
    while True:
        try:
            msgs = await sub.fetch(batch=64, timeout=1.0)
        except (TimeoutError, NatsTimeout):  # nats-py raises either
            continue
        await asyncio.gather(*(answer(js, names, m) for m in msgs))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
