"""Every name of the outside world: NATS subjects, streams, consumers, headers, S3 keys.

Names are derived from one prefix so that tests and demos can run side by side on one
NATS server without seeing each other's messages.
"""

from __future__ import annotations

from dataclasses import dataclass

MSG_ID_HEADER = "Nats-Msg-Id"
SCHEMA_HEADER = "Lorafaas-Schema"
# Callbacks: "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<body>'>" under the tenant's secret.
SIGNATURE_HEADER = "Lorafaas-Signature"
CALLBACK_ID_HEADER = "Lorafaas-Invocation-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
DEAD_REASON_HEADER = "Lorafaas-Dead-Reason"
# Set on an invocation the control plane moved off a dead or drained worker's queue.
REROUTED_HEADER = "Lorafaas-Rerouted-From"


# --- exactly-once message ids -------------------------------------------------------
# JetStream drops a publish whose Nats-Msg-Id it saw within the duplicate window, so every
# message that must take effect once carries one of these ids, spelled only here.
def invocation_msg_id(invocation_id: str) -> str:
    """The invocation itself on the work queue (a gateway retry publishes it again)."""
    return invocation_id


def started_msg_id(invocation_id: str) -> str:
    return f"started-{invocation_id}"


def result_msg_id(invocation_id: str) -> str:
    """The one result of an invocation, whoever sends it (worker, gateway cancel, dead-letter mover)."""
    return f"result-{invocation_id}"


def cancel_msg_id(invocation_id: str) -> str:
    return f"cancel-{invocation_id}"


def dead_msg_id(invocation_id: str) -> str:
    """An invocation copied to the dead-letter stream."""
    return f"dead-{invocation_id}"


def dead_message_msg_id(stream: str, seq: int) -> str:
    """A message that names no invocation this code can read (another schema), by its place in its stream."""
    return f"dead-{stream}-{seq}"


def dead_event_msg_id(kind: str, invocation_id: str) -> str:
    """A worker event the control plane could not apply, copied to the dead-letter stream."""
    return f"dead-{kind}-{invocation_id}"


def _token(value: str) -> str:
    """A NATS subject token: no dots, spaces or wildcards."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in value)


@dataclass(frozen=True)
class Names:
    prefix: str = "lorafaas"

    # --- streams -------------------------------------------------------------------
    @property
    def invocations_stream(self) -> str:
        return f"{_token(self.prefix).upper()}_INVOCATIONS"

    @property
    def events_stream(self) -> str:
        return f"{_token(self.prefix).upper()}_EVENTS"

    @property
    def dead_letter_stream(self) -> str:
        return f"{_token(self.prefix).upper()}_DEAD"

    @property
    def cancels_stream(self) -> str:
        return f"{_token(self.prefix).upper()}_CANCELS"

    # --- subjects ------------------------------------------------------------------
    def invoke_subject(self, backbone: str) -> str:
        """Work queue of one backbone: every worker holding it pulls from here."""
        return f"{self.prefix}.invoke.{_token(backbone)}"

    def invoke_worker_subject(self, backbone: str, worker_id: str) -> str:
        """One worker's own queue: the gateway routes here an invocation of a function it holds."""
        return f"{self.prefix}.invoke.{_token(backbone)}.worker.{_token(worker_id)}"

    @property
    def invoke_wildcard(self) -> str:
        return f"{self.prefix}.invoke.>"

    def result_subject(self, invocation_id: str) -> str:
        return f"{self.prefix}.events.result.{invocation_id}"

    def started_subject(self, invocation_id: str) -> str:
        return f"{self.prefix}.events.started.{invocation_id}"

    @property
    def events_wildcard(self) -> str:
        return f"{self.prefix}.events.>"

    def token_subject(self, invocation_id: str) -> str:
        """Core NATS (not persisted): streamed tokens of one invocation."""
        return f"{self.prefix}.tokens.{invocation_id}"

    def cancel_subject(self, invocation_id: str) -> str:
        """Kept in the cancels stream, and heard live by every worker on core NATS."""
        return f"{self.prefix}.cancel.{invocation_id}"

    @property
    def cancel_wildcard(self) -> str:
        return f"{self.prefix}.cancel.>"

    def max_deliveries_advisory(self, stream: str) -> str:
        """JetStream's advisory when a message of ``stream`` exhausted MaxDeliver on any consumer."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*"

    def dead_letter_subject(self, backbone: str) -> str:
        return f"{self.prefix}.dead.{_token(backbone)}"

    def dead_event_subject(self, kind: str) -> str:
        """Worker events the control plane refused (a data error), kept with the reason for an operator."""
        return f"{self.prefix}.dead-events.{_token(kind)}"

    @property
    def dead_letter_subjects(self) -> list[str]:
        return [f"{self.prefix}.dead.>", f"{self.prefix}.dead-events.>"]

    def worker_command_subject(self, worker_id: str) -> str:
        return f"{self.prefix}.worker.{_token(worker_id)}.command"

    def peer_adapter_subject(self, sha256: str) -> str:
        """Core NATS: every worker holding an adapter in host memory answers here (one queue group)."""
        return f"{self.prefix}.peer.adapter.{_token(sha256)}"

    @property
    def contention_subject(self) -> str:
        return f"{self.prefix}.contention"

    @property
    def heartbeat_subject(self) -> str:
        return f"{self.prefix}.heartbeat"

    @property
    def tenant_changed_subject(self) -> str:
        """Core NATS: a tenant's keys, status or quotas changed; gateways drop their cached copies."""
        return f"{self.prefix}.controlplane.tenant_changed"

    # --- consumers -----------------------------------------------------------------
    def worker_consumer(self, backbone: str) -> str:
        return f"workers-{_token(backbone)}"

    def worker_own_consumer(self, worker_id: str) -> str:
        """The durable consumer of one worker's own subject (a second consumer: NATS 2.9 filters one subject)."""
        return f"worker-{_token(worker_id)}"

    def reroute_consumer(self, worker_id: str) -> str:
        """The control plane's consumer that moves a dead or drained worker's queue to the shared subject."""
        return f"reroute-{_token(worker_id)}"

    # --- key-value buckets ---------------------------------------------------------
    @property
    def placement_bucket(self) -> str:
        """The placement table the control plane publishes and every gateway watches."""
        return f"{_token(self.prefix).upper()}_PLACEMENT"

    def placement_key(self, backbone: str) -> str:
        return f"table.{_token(backbone)}"

    @property
    def controlplane_consumer(self) -> str:
        return "controlplane"


# --- S3 layout ---------------------------------------------------------------------
def adapter_prefix(tenant_id: str, sha256: str) -> str:
    """Adapters live under their tenant and are keyed by the hash of their content."""
    return f"tenants/{tenant_id}/adapters/{sha256}"


def reroute_msg_id(invocation_id: str, stream_seq: int) -> str:
    """A moved invocation's id: its source message's sequence makes a retried move a duplicate."""
    return f"reroute-{invocation_id}-{stream_seq}"


def backbone_prefix(name: str) -> str:
    return f"backbones/{_token(name)}"
