"""A worker that takes one invocation and never acks it: the test SIGKILLs it mid-way.

Usage: python fake_worker.py NATS_URL PREFIX BACKBONE ACK_WAIT_S MAX_DELIVER
"""

from __future__ import annotations

import asyncio
import sys

import nats
from nats.errors import TimeoutError as NatsTimeout

from lorafaas.names import Names
from lorafaas.settings import NatsSettings
from lorafaas.streams import ensure_streams, pull_invocations
from lorafaas.wire import Invocation


async def main(url: str, prefix: str, backbone: str, ack_wait_s: float, max_deliver: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    names = Names(prefix)
    await ensure_streams(js, names)
    sub = await pull_invocations(
        js, names, backbone, NatsSettings(url=url, prefix=prefix, ack_wait_s=ack_wait_s, max_deliver=max_deliver)
    )
    print("ready", flush=True)
    while True:
        try:
            msgs = await sub.fetch(batch=1, timeout=1.0)
        except (TimeoutError, NatsTimeout):  # nats-py raises either
            continue
        print("took", Invocation.decode(msgs[0].data).invocation_id, flush=True)
        await asyncio.sleep(3600)  # holds the message, unacked, until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])))
