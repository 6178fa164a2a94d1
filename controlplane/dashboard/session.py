"""Dashboard sessions: a signed cookie that names an API key (never its secret) or the operator.

The cookie is httpOnly and SameSite=Strict and signed with a key derived from the operator
token (itsdangerous, HMAC-SHA1 over a timestamped payload). It carries:

- ``c``: the CSRF token every form must echo (a fresh one at each sign-in);
- ``k``: the id of the API key the tenant signed in with, checked on every request, so a
  revoked key, an expired one or a suspended tenant ends the session at once;
- ``o``: for the operator, a digest of the operator token, so changing the token ends it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from controlplane.services.keys import Principal

COOKIE = "lorafaas_dashboard"
MAX_AGE_S = 12 * 3600


@dataclass(frozen=True)
class SessionData:
    """What the cookie holds once its signature checked out."""

    csrf: str
    key_id: str | None = None
    operator: str | None = None  # digest of the operator token at sign-in


@dataclass(frozen=True)
class Viewer:
    """Who looks at a page: a tenant (through one of its keys) or the operator."""

    csrf: str
    principal: Principal | None = None
    operator: bool = False

    @property
    def tenant_id(self) -> str:
        assert self.principal is not None, "a tenant page without a tenant viewer"
        return self.principal.tenant_id


def _serializer(admin_token: str) -> URLSafeTimedSerializer:
    # A key of its own, derived from the operator token: the token itself never signs anything.
    secret = hashlib.sha256(b"lorafaas-dashboard-session\x00" + admin_token.encode()).hexdigest()
    return URLSafeTimedSerializer(secret, salt="lorafaas-dashboard")


def operator_digest(admin_token: str) -> str:
    """A value that changes with the operator token, stored instead of the token."""
    return hmac.new(admin_token.encode(), b"lorafaas-dashboard-operator", hashlib.sha256).hexdigest()[:32]


def read(request: Request, admin_token: str) -> SessionData | None:
    """The cookie's contents, or None when it is missing, forged or older than ``MAX_AGE_S``."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    try:
        data = _serializer(admin_token).loads(raw, max_age=MAX_AGE_S)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("c"), str):
        return None
    return SessionData(csrf=data["c"], key_id=data.get("k"), operator=data.get("o"))


def write(response: Response, request: Request, admin_token: str, data: SessionData) -> None:
    payload: dict[str, str] = {"c": data.csrf}
    if data.key_id:
        payload["k"] = data.key_id
    if data.operator:
        payload["o"] = data.operator
    response.set_cookie(
        COOKIE,
        _serializer(admin_token).dumps(payload),
        max_age=MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/dashboard",
    )


def clear(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


def csrf_ok(expected: str, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(expected.encode(), (sent or "").encode())
