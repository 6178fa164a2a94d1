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

    @property
    def invoke_wildcard(self) -> str:
        return f"{self.prefix}.invoke.>"

    def result_subject(self, invocation_id: str) -> str:
        return f"{self.prefix}.events.result.{invocation_id}"

    def started_subject(self, invocation_id: str) -> str:
        return f"{self.prefix}.events.started.{invocation_id}"

    def usage_subject(self, invocation_id: str) -> str:
        return f"{self.prefix}.events.usage.{invocation_id}"

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

    def worker_command_subject(self, worker_id: str) -> str:
        return f"{self.prefix}.worker.{_token(worker_id)}.command"

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

    @property
    def controlplane_consumer(self) -> str:
        return "controlplane"


# --- S3 layout ---------------------------------------------------------------------
def adapter_prefix(tenant_id: str, sha256: str) -> str:
    """Adapters live under their tenant and are keyed by the hash of their content."""
    return f"tenants/{tenant_id}/adapters/{sha256}"


def backbone_prefix(name: str) -> str:
    return f"backbones/{_token(name)}"
