"""JetStream streams and consumers, declared once and ensured idempotently by every service."""

from __future__ import annotations

import contextlib

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from lorafaas.names import Names
from lorafaas.settings import NatsSettings

DUPLICATE_WINDOW_S = 120.0
EVENTS_MAX_AGE_S = 7 * 24 * 3600.0
# The control plane applies an event in milliseconds; a generous AckWait only matters if it dies.
EVENTS_ACK_WAIT_S = 30.0
# Deliveries of one event before the control plane gives up on it and dead-letters it. A
# database outage costs an event one delivery (the consumer pauses until the database is back).
EVENTS_MAX_DELIVER = 20


def stream_configs(names: Names) -> list[StreamConfig]:
    return [
        # Work queue: a message leaves the stream once a worker acks it.
        StreamConfig(
            name=names.invocations_stream,
            subjects=[names.invoke_wildcard],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
        StreamConfig(
            name=names.events_stream,
            subjects=[names.events_wildcard],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=EVENTS_MAX_AGE_S,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
        # One cancel marker per invocation, checked by a worker before it starts one.
        StreamConfig(
            name=names.cancels_stream,
            subjects=[names.cancel_wildcard],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            max_age=EVENTS_MAX_AGE_S,
        ),
        StreamConfig(
            name=names.dead_letter_stream,
            subjects=names.dead_letter_subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=EVENTS_MAX_AGE_S,
        ),
    ]


async def ensure_streams(js: JetStreamContext, names: Names) -> None:
    for config in stream_configs(names):
        try:
            await js.stream_info(config.name or "")
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)


async def delete_streams(js: JetStreamContext, names: Names) -> None:
    """Remove a prefix's streams (tests and benchmarks clean up after themselves)."""
    for config in stream_configs(names):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(config.name or "")


def worker_consumer_config(names: Names, backbone: str, nats: NatsSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.worker_consumer(backbone),
        filter_subject=names.invoke_subject(backbone),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=nats.ack_wait_s,
        max_deliver=nats.max_deliver,
        deliver_policy=DeliverPolicy.ALL,
    )


async def pull_invocations(
    js: JetStreamContext, names: Names, backbone: str, nats: NatsSettings
) -> JetStreamContext.PullSubscription:
    """The pull subscription every worker of ``backbone`` shares (one durable consumer)."""
    config = worker_consumer_config(names, backbone, nats)
    return await js.pull_subscribe(
        names.invoke_subject(backbone), durable=config.durable_name, stream=names.invocations_stream, config=config
    )


def controlplane_consumer_config(names: Names, nats: NatsSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.controlplane_consumer,
        filter_subject=names.events_wildcard,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=EVENTS_ACK_WAIT_S,
        # Bounded: the consumer dead-letters an event on its last delivery rather than retry it forever.
        max_deliver=EVENTS_MAX_DELIVER,
        deliver_policy=DeliverPolicy.ALL,
    )
