"""Where callbacks may be delivered: public addresses only, unless the operator allows a network.

A callback URL is the caller's choice, and the control plane POSTs to it from inside the
platform's network, so without a check any tenant could reach loopback services, the cloud
metadata endpoint (169.254.169.254) or private hosts. Loopback, link-local, private,
multicast, reserved and unspecified addresses are refused unless they fall in
``callbacks.allowed_networks``. The gateway checks the URL when it accepts the invocation
(IP literals and ``localhost``: a 400); the dispatcher checks every address the host resolves
to right before each delivery (a name can point anywhere, and change).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from lorafaas.errors import InvalidInput
from lorafaas.settings import CallbackSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EgressPolicy:
    """The networks callbacks may reach although they are not public."""

    def __init__(self, allowed_networks: Iterable[str] = ()) -> None:
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    @classmethod
    def of(cls, settings: CallbackSettings) -> EgressPolicy:
        return cls(settings.allowed_networks)

    def permits(self, address: IPAddress) -> bool:
        """Public addresses always; any other only inside an allowed network."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed):
            return True
        return address.is_global and not address.is_multicast

    def check_url(self, url: str) -> None:
        """400 for a URL that is not http(s) with a host, or names a refused address or localhost."""
        if any(ord(c) < 0x21 or c == "\x7f" for c in url):  # NUL, spaces, line breaks: never a real URL
            raise InvalidInput("callback_url contains a control character or space", param="callback_url")
        try:
            parts = urlsplit(url)
            host, _port = parts.hostname, parts.port  # the port raises ValueError when out of range
        except ValueError as e:
            raise InvalidInput(f"callback_url is not a valid URL ({e})", param="callback_url") from e
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidInput("callback_url must be an http:// or https:// URL with a host", param="callback_url")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if not self.permits(literal):
                raise InvalidInput(
                    f"callback_url points at {host}, a loopback, private or link-local address; "
                    "callbacks go to public addresses only",
                    param="callback_url",
                )
        elif host == "localhost" or host.endswith(".localhost"):
            if not self.permits(ipaddress.ip_address("127.0.0.1")):
                raise InvalidInput(
                    "callback_url points at localhost; callbacks go to public addresses only", param="callback_url"
                )

    async def refused_address(self, url: str) -> str | None:
        """Before a delivery: why this URL's host may not be reached now, or None when it may."""
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return None  # unresolvable now: the POST fails the same way and is retried like any connect error
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])  # drop an IPv6 zone (fe80::1%eth0)
            if not self.permits(address):
                return f"refused: {host} resolves to {address}, a loopback, private or link-local address"
        return None
