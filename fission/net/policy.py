"""Egress policy, the pure parts: what a sandbox may reach, and which addresses are never public.

A policy is off (the default: the VM has no way out at all) or on with an allowlist. Each entry
is ``HOST[:PORT]``: a name (``api.example.com``), a wildcard for its subdomains
(``*.example.com``, which does not match ``example.com`` itself) or a literal address
(``127.0.0.1``, ``[::1]:8080``). Without a port an entry allows 80 and 443. Names are resolved by
the proxy on the host, and an address that is not public (loopback, private, link-local such as
169.254.169.254, multicast, reserved, unspecified, and the IPv4 inside an IPv4-mapped IPv6
address) is refused even when an allowed name resolves to it, unless that literal address was
allowed itself. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from fission.errors import InvalidInput

DEFAULT_PORTS = (80, 443)
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
MAX_ALLOWED_HOSTS = 64
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class HostRule:
    """One allowlist entry: a name, a ``*.`` wildcard or a literal address, and its ports."""

    host: str  # lower-case name without a trailing dot, "*.suffix", or a normalised address
    ports: tuple[int, ...]

    @property
    def literal(self) -> IPAddress | None:
        """The address this entry names literally, or None for names and wildcards."""
        return parse_address(self.host)

    def matches(self, host: str, port: int) -> bool:
        """True when this entry allows ``host`` (as the client named it) on ``port``."""
        if port not in self.ports:
            return False
        host = normalise_host(host)
        if self.host.startswith("*."):
            suffix = self.host[1:]
            return host.endswith(suffix) and len(host) > len(suffix)
        return host == self.host

    def __str__(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        ports = ",".join(str(p) for p in self.ports)
        return shown if self.ports == DEFAULT_PORTS else f"{shown}:{ports}"


def parse_address(text: str) -> IPAddress | None:
    """``text`` as an IP address (brackets allowed), or None when it is a name."""
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def normalise_host(host: str) -> str:
    """A host as compared: lower case, no trailing dot, addresses in canonical form."""
    address = parse_address(host)
    if address is not None:
        return str(address)
    return host.strip().lower().rstrip(".")


def parse_rule(entry: str) -> HostRule:
    """Parse one ``HOST[:PORT]`` allowlist entry; InvalidInput names what is wrong."""
    text = entry.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise InvalidInput(f"--allow-host {entry!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    ports: tuple[int, ...] = DEFAULT_PORTS
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise InvalidInput(f"--allow-host {entry!r}: the port must be 1 to 65535")
        ports = (int(port_text),)
    address = parse_address(host)
    if address is not None:
        return HostRule(str(address), ports)
    name = normalise_host(host)
    label_part = name[2:] if name.startswith("*.") else name
    labels = label_part.split(".")
    valid = all(
        label and len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label)
        for label in labels
    )
    if not label_part or not valid or len(name) > 253 or "*" in label_part:
        raise InvalidInput(
            f"--allow-host {entry!r} is not a host name, *.domain wildcard or IP address"
        )
    return HostRule(name, ports)


def address_class(address: IPAddress) -> str | None:
    """Why ``address`` is not public ("loopback", "private", ...), or None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_class(address.ipv4_mapped)
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    )
    for name, hit in checks:
        if hit:
            return name
    if not address.is_global:
        return "reserved"  # shared address space, documentation ranges and the like
    return None


@dataclass(frozen=True)
class NetworkPolicy:
    """What a sandbox may reach: nothing (the default), or the allowlisted hosts within caps."""

    enabled: bool = False
    allow: tuple[HostRule, ...] = ()
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if len(self.allow) > MAX_ALLOWED_HOSTS:
            raise InvalidInput(f"{len(self.allow)} allowed hosts; the most is {MAX_ALLOWED_HOSTS}")
        if self.allow and not self.enabled:
            raise InvalidInput("--allow-host needs --network")
        if not 1 <= self.max_connections <= 256:
            raise InvalidInput("max_connections must be 1 to 256")
        if not 1 <= self.max_bytes <= 1 << 40:
            raise InvalidInput("max_bytes must be positive")

    @classmethod
    def none(cls) -> NetworkPolicy:
        """No network at all."""
        return cls()

    @classmethod
    def allowing(cls, hosts: list[str] | tuple[str, ...], **caps: int) -> NetworkPolicy:
        """Network on, reaching only ``hosts`` (``HOST[:PORT]`` entries)."""
        return cls(True, tuple(parse_rule(h) for h in hosts), **caps)

    @property
    def value(self) -> str:
        """``none`` or ``allowlist``: the policy's kind, as listings show it."""
        return "allowlist" if self.enabled else "none"

    def allows_name(self, host: str, port: int) -> bool:
        """True when some entry allows ``host`` (a name or an address) on ``port``."""
        return any(rule.matches(host, port) for rule in self.allow)

    def allows_address(self, address: IPAddress, port: int) -> bool:
        """True when ``address`` may be dialled: public, or allowed literally on ``port``."""
        if address_class(address) is None:
            return True
        return any(
            rule.literal is not None and same_address(rule.literal, address) and port in rule.ports
            for rule in self.allow
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (the APIs' ``network`` object)."""
        return {
            "enabled": self.enabled,
            "allow_hosts": [str(rule) for rule in self.allow],
            "max_connections": self.max_connections,
            "max_bytes": self.max_bytes,
        }

    @classmethod
    def from_json(cls, data: Any) -> NetworkPolicy:
        """A policy from the APIs' form: None/"none", or {enabled, allow_hosts, caps}."""
        if data is None or data == "none":
            return cls()
        if not isinstance(data, dict):
            raise InvalidInput('network must be "none" or an object {"enabled", "allow_hosts"}')
        hosts = data.get("allow_hosts") or []
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise InvalidInput("network.allow_hosts must be a list of HOST[:PORT] strings")
        caps = {
            key: data[key] for key in ("max_connections", "max_bytes") if data.get(key) is not None
        }
        for key, value in caps.items():
            if type(value) is not int:
                raise InvalidInput(f"network.{key} must be an integer")
        enabled = data.get("enabled", True)
        if type(enabled) is not bool:
            raise InvalidInput("network.enabled must be true or false")
        return cls(enabled, tuple(parse_rule(h) for h in hosts), **caps)


def same_address(a: IPAddress, b: IPAddress) -> bool:
    """True when two addresses are the same host (an IPv4-mapped IPv6 equals its IPv4)."""
    return unmap(a) == unmap(b)


def unmap(address: IPAddress) -> IPAddress:
    """The IPv4 inside an IPv4-mapped IPv6 address, else the address itself."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
