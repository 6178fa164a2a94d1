"""What an API key may do: the scope names, stated once for the gateway, the control plane and the CLI."""

from __future__ import annotations

from typing import Literal, get_args

Scope = Literal["invoke", "read-usage", "manage-functions"]
ALL_SCOPES: tuple[Scope, ...] = get_args(Scope)
INVOKE, READ_USAGE, MANAGE = ALL_SCOPES
