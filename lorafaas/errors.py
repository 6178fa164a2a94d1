"""Domain errors: a small hierarchy with fields. ``lorafaas.http_errors`` maps them to HTTP once."""

from __future__ import annotations


class LorafaasError(Exception):
    """Base of every error the platform raises on purpose."""

    code = "error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(LorafaasError):
    code = "invalid_request"


class Unauthenticated(LorafaasError):
    code = "invalid_api_key"


class Forbidden(LorafaasError):
    code = "forbidden"


class NotFound(LorafaasError):
    code = "not_found"


class Conflict(LorafaasError):
    code = "conflict"


class InvalidArtifact(LorafaasError):
    """An adapter folder that cannot be served: names the file, tensor and problem."""

    code = "invalid_artifact"


class ArtifactIntegrityError(LorafaasError):
    """Downloaded bytes do not match the recorded hash."""

    code = "artifact_integrity"


class QuotaExceeded(LorafaasError):
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, retry_after_s: float = 1.0, headers: dict[str, str] | None = None, **details: object
    ) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s
        # Extra response headers, e.g. x-ratelimit-limit-requests / x-ratelimit-remaining-requests.
        self.headers = headers or {}


class PaymentRequired(LorafaasError):
    code = "spend_cap_reached"


class InvocationTimeout(LorafaasError):
    code = "timeout"


class ServiceUnavailable(LorafaasError):
    code = "service_unavailable"

    def __init__(self, message: str, retry_after_s: float = 1.0, **details: object) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class InvocationFailed(LorafaasError):
    """A worker could not complete an accepted invocation for a reason that is not the caller's."""

    code = "invocation_failed"


def error_for_code(code: str | None, message: str, **details: object) -> LorafaasError:
    """Rebuild the domain error a worker reported by its code (default: InvocationFailed)."""
    for cls in (InvalidInput, InvalidArtifact, ArtifactIntegrityError, NotFound):
        if cls.code == code:
            return cls(message, **details)
    return InvocationFailed(message, **details)
