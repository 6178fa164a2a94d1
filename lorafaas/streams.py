"""JetStream streams and consumers, declared once and ensured idempotently by every service."""

from __future__ import annotations

import contextlib
import json

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from lorafaas.names import MSG_ID_HEADER, REROUTED_HEADER, Names, reroute_msg_id
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
    with contextlib.suppress(NotFoundError, BucketNotFoundError):
        await js.delete_key_value(names.placement_bucket)


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


def worker_own_consumer_config(names: Names, backbone: str, worker_id: str, nats: NatsSettings) -> ConsumerConfig:
    """One worker's own queue (routed invocations), beside the backbone's shared consumer."""
    return ConsumerConfig(
        durable_name=names.worker_own_consumer(worker_id),
        filter_subject=names.invoke_worker_subject(backbone, worker_id),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=nats.ack_wait_s,
        max_deliver=nats.max_deliver,
        deliver_policy=DeliverPolicy.ALL,
    )


async def pull_own_invocations(
    js: JetStreamContext, names: Names, backbone: str, worker_id: str, nats: NatsSettings
) -> JetStreamContext.PullSubscription:
    config = worker_own_consumer_config(names, backbone, worker_id, nats)
    subject = names.invoke_worker_subject(backbone, worker_id)
    return await js.pull_subscribe(subject, durable=config.durable_name, stream=names.invocations_stream, config=config)


async def placement_bucket(js: JetStreamContext, names: Names) -> KeyValue:
    """The placement table's bucket (created if missing): one key per backbone, last value only."""
    try:
        return await js.key_value(names.placement_bucket)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=names.placement_bucket, history=1))


async def republish_to_shared(js: JetStreamContext, names: Names, backbone: str, msg: Msg, from_worker: str) -> None:
    """Move one invocation message from a worker's own subject to the backbone's shared subject.

    The copy is stored before the original is acked; its message id comes from the original's
    stream sequence, so moving the same message twice (a retry after a crash) stores one copy.
    """
    try:
        invocation_id = json.loads(msg.data).get("invocation_id", "unknown")
    except ValueError:
        invocation_id = "undecodable"
    headers = {
        MSG_ID_HEADER: reroute_msg_id(invocation_id, msg.metadata.sequence.stream),
        REROUTED_HEADER: from_worker,
    }
    await js.publish(names.invoke_subject(backbone), msg.data, headers=headers)
    await msg.ack_sync()
