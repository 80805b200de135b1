"""Flood control: token buckets, exponential back-off after failures, trusted networks.

Pure and synchronous (time is passed in), so it is tested without sleeping.
Every table is bounded: past ``max_keys`` the least recently used entries go
first, so a flood of distinct names or addresses cannot grow memory forever.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

DEFAULT_MAX_KEYS = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[object, _Bucket] = OrderedDict()
        self._max_keys = max_keys

    def take(self, key: object, now: float) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until one is available."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)  # most recently used last
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate


@dataclass
class _Failures:
    count: int
    blocked_until: float
    last: float  # when the latest failure was


class BackOff:
    """After ``free`` failures, each further one doubles the wait (1 s, 2 s, 4 s...).

    The wait is capped at ``max_delay``.  A success clears the key, and so does a
    quiet spell of ``max_delay`` with no failure (a shared address is not punished
    forever for someone's typos long ago).
    """

    def __init__(self, free: int, max_delay: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.free, self.max_delay = free, max_delay
        self._failures: OrderedDict[object, _Failures] = OrderedDict()
        self._max_keys = max_keys

    def wait(self, key: object, now: float) -> float:
        """Seconds before ``key`` may try again (0.0: now)."""
        entry = self._failures.get(key)
        return 0.0 if entry is None else max(0.0, entry.blocked_until - now)

    def failed(self, key: object, now: float) -> None:
        entry = self._failures.pop(key, None)
        if entry is None or now - entry.last > self.max_delay:
            entry = _Failures(0, now, now)
        entry.count += 1
        entry.last = now
        if entry.count > self.free:
            delay = min(self.max_delay, 2.0 ** (entry.count - self.free - 1))
            entry.blocked_until = now + delay
        self._failures[key] = entry
        if len(self._failures) > self._max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, key: object) -> None:
        self._failures.pop(key, None)


class Networks:
    """A set of address ranges, e.g. the trusted ones exempt from per-address limits."""

    def __init__(self, spec: str) -> None:
        self._networks = [
            ipaddress.ip_network(part.strip(), strict=False)
            for part in spec.split(",")
            if part.strip()
        ]

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)


def address_key(address: str) -> str:
    """What per-address limits count by: the IPv4 address, or the IPv6 /64 (one subscriber)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class GuardSettings(Protocol):
    @property
    def message_rate(self) -> float: ...
    @property
    def message_burst(self) -> int: ...
    @property
    def login_free_failures(self) -> int: ...
    @property
    def login_max_delay(self) -> float: ...
    @property
    def register_rate(self) -> float: ...
    @property
    def register_burst(self) -> int: ...
    @property
    def trusted_networks(self) -> str: ...


class Guards:
    """The server's flood controls, shared by every connection."""

    def __init__(self, settings: GuardSettings) -> None:
        self.messages = RateLimiter(settings.message_rate, settings.message_burst)
        self.registrations = RateLimiter(settings.register_rate, settings.register_burst)
        self.logins = BackOff(settings.login_free_failures, settings.login_max_delay)
        self.trusted = Networks(settings.trusted_networks)

    def reconfigure(self, settings: GuardSettings) -> None:
        """New limits (SIGHUP), keeping what each key has used so far."""
        self.messages.rate, self.messages.burst = settings.message_rate, settings.message_burst
        self.registrations.rate = settings.register_rate
        self.registrations.burst = settings.register_burst
        self.logins.free, self.logins.max_delay = (
            settings.login_free_failures,
            settings.login_max_delay,
        )
        self.trusted = Networks(settings.trusted_networks)
