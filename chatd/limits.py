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

from chatd.errors import RateLimited

DEFAULT_MAX_KEYS = 100_000


@dataclass(slots=True)
class Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[object, Bucket] = OrderedDict()
        self._max_keys = max_keys

    def take(self, key: object, now: float) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until one is available."""
        bucket = self.refilled(key, now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return self.wait(bucket)

    def refilled(self, key: object, now: float) -> Bucket:
        """The key's bucket, refilled up to ``now`` and made the most recently used.

        take() is refilled() then spending one token, or wait(); several takes at one
        ``now`` (the sends of one read, App.handle_many) may refill once and spend from
        the bucket in turn: refilling again at the same time adds nothing and the key is
        already the most recent, so each gets take()'s very answer."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(self.burst, now)
            if len(buckets) > self._max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)  # most recently used last
        tokens = bucket.tokens + (now - bucket.updated) * self.rate
        bucket.tokens = tokens if tokens < self.burst else self.burst  # min(), without a call
        bucket.updated = now
        return bucket

    def wait(self, bucket: Bucket) -> float:
        """Seconds until the (refilled) bucket holds a token."""
        return (1 - bucket.tokens) / self.rate


@dataclass(slots=True)
class _Guesses:
    failures: int = 0  # failed guesses in a row, forgotten after a quiet max_delay
    blocked_until: float = 0.0
    last: float = 0.0  # when the latest failure was
    in_flight: int = 0  # guesses started whose verdict is not known yet


class BackOff:
    """Guesses at a password, per key: free ones, then waits that double.

    The n-th failure in a row, from the ``free``-th on, makes the key wait
    ``2 ** (n - free)`` seconds (1 s, 2 s, 4 s...), at most ``max_delay``: ``free``
    guesses, then waits between the next ones.  A guess counts when it
    *starts*: while guesses are being checked, a new one is allowed only if it would
    still be free should all of them fail (so a burst of concurrent guesses gets no
    more than the free ones checked); past the free ones, one at a time, after the
    wait.  A success clears the failures; so does a quiet spell of ``max_delay``.
    """

    def __init__(self, free: int, max_delay: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.free, self.max_delay = free, max_delay
        self._guesses: OrderedDict[object, _Guesses] = OrderedDict()
        self._max_keys = max_keys

    def delay_after(self, failures: int) -> float:
        """The wait imposed by the ``failures``-th failure in a row."""
        if failures == 0 or failures < self.free:
            return 0.0
        return min(self.max_delay, 2.0 ** (failures - self.free))

    def wait(self, key: object, now: float) -> float:
        """Seconds before a new guess for ``key`` may start (0.0: now).

        With guesses in flight, the answer is the wait they would impose if they all
        failed: the soonest a further guess could be allowed.
        """
        entry = self._current(key, now)
        if entry is None or entry.failures + entry.in_flight < self.free:
            return 0.0
        blocked = max(0.0, entry.blocked_until - now)
        if entry.in_flight == 0:
            return blocked
        return max(blocked, self.delay_after(entry.failures + entry.in_flight))

    def blocked(self, key: object, now: float) -> float:
        """Seconds left of the wait imposed by past failures, ignoring guesses in flight."""
        entry = self._current(key, now)
        return 0.0 if entry is None else max(0.0, entry.blocked_until - now)

    def has_failed(self, key: object, now: float) -> bool:
        """Whether ``key`` has a failure not yet forgotten."""
        entry = self._current(key, now)
        return entry is not None and entry.failures > 0

    def in_flight(self, key: object) -> int:
        entry = self._guesses.get(key)
        return 0 if entry is None else entry.in_flight

    def started(self, key: object, now: float) -> None:
        """A guess for ``key`` is being checked: it counts from now."""
        entry = self._current(key, now)
        if entry is None:
            entry = self._guesses[key] = _Guesses()
            self._evict()
        entry.in_flight += 1

    def failed(self, key: object, now: float) -> None:
        """A guess (started, or unannounced) failed."""
        entry = self._current(key, now)
        if entry is None:
            entry = self._guesses[key] = _Guesses()
            self._evict()
        else:
            entry.in_flight = max(0, entry.in_flight - 1)
        entry.failures += 1
        entry.last = now
        entry.blocked_until = now + self.delay_after(entry.failures)

    def succeeded(self, key: object) -> None:
        """A guess succeeded: the failures are cleared (other guesses stay in flight)."""
        entry = self._guesses.get(key)
        if entry is not None:
            entry.failures, entry.blocked_until = 0, 0.0
            self._finish(key, entry)

    def released(self, key: object) -> None:
        """A started guess ended with no verdict (the server was busy): it does not count."""
        entry = self._guesses.get(key)
        if entry is not None:
            self._finish(key, entry)

    def _finish(self, key: object, entry: _Guesses) -> None:
        entry.in_flight = max(0, entry.in_flight - 1)
        if entry.in_flight == 0 and entry.failures == 0:
            del self._guesses[key]

    def _current(self, key: object, now: float) -> _Guesses | None:
        """The key's entry, its failures forgotten after a quiet ``max_delay``."""
        entry = self._guesses.get(key)
        if entry is None:
            return None
        self._guesses.move_to_end(key)  # most recently used last
        if entry.failures and now - entry.last > self.max_delay:
            entry.failures, entry.blocked_until = 0, 0.0
        return entry

    def _evict(self) -> None:
        # Least recently used first, but never an entry with guesses in flight: its
        # count would be lost.  Those are few (each holds a place in the hash queue).
        for _ in range(len(self._guesses)):
            if len(self._guesses) <= self._max_keys:
                return
            key, entry = next(iter(self._guesses.items()))
            if entry.in_flight:
                self._guesses.move_to_end(key)
            else:
                del self._guesses[key]


# The retry hint when a name already has login_name_concurrency guesses being checked:
# about the time one takes at production cost, doubled.
NAME_BUSY_RETRY = 0.25


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """The keys one /login guess was counted under, until its verdict is known."""

    name: str  # the name's case-insensitive key
    address: str  # address_key() of the caller
    by_address: bool  # False for a trusted address: not counted per address

    @property
    def pair(self) -> tuple[str, str]:
        return (self.name, self.address)


class LoginGuard:
    """Who may have a password checked now, and what each verdict counts towards.

    Strict back-off (``BackOff``) per (name, address) and per address (unless
    trusted): a guesser is slowed wherever it guesses from.  Per name alone, only a
    gentle limit, so that nobody can lock an account from everywhere: at most
    ``name_concurrency`` guesses checked at once, and the name's own back-off, which
    applies only to an address that has a failure for that name.  An owner logging in
    from an address that has not failed is never kept waiting by others' failures.
    """

    def __init__(self, free: int, max_delay: float, name_concurrency: int) -> None:
        self.pairs = BackOff(free, max_delay)
        self.addresses = BackOff(free, max_delay)
        self.names = BackOff(free, max_delay)
        self.name_concurrency = name_concurrency

    def reconfigure(self, free: int, max_delay: float, name_concurrency: int) -> None:
        for table in (self.pairs, self.addresses, self.names):
            table.free, table.max_delay = free, max_delay
        self.name_concurrency = name_concurrency

    def start(self, name: str, address: str, by_address: bool, now: float) -> LoginAttempt:
        """Count a guess as it starts, or raise RateLimited (then nothing is counted)."""
        attempt = LoginAttempt(name, address, by_address)
        wait = self.pairs.wait(attempt.pair, now)
        if by_address:
            wait = max(wait, self.addresses.wait(address, now))
        if self.pairs.has_failed(attempt.pair, now):
            wait = max(wait, self.names.blocked(name, now))
        if wait:
            raise RateLimited("too many failed logins: wait before trying again", wait)
        if self.names.in_flight(name) >= self.name_concurrency:
            raise RateLimited("too many logins for this name at once", NAME_BUSY_RETRY)
        for table, key in self._tables(attempt):
            table.started(key, now)
        return attempt

    def failed(self, attempt: LoginAttempt, now: float) -> None:
        for table, key in self._tables(attempt):
            table.failed(key, now)

    def succeeded(self, attempt: LoginAttempt) -> None:
        """Clears the name's failures, from everywhere; not the address's (one account
        logged into does not excuse guesses at others)."""
        self.pairs.succeeded(attempt.pair)
        self.names.succeeded(attempt.name)
        if attempt.by_address:
            self.addresses.released(attempt.address)

    def released(self, attempt: LoginAttempt) -> None:
        for table, key in self._tables(attempt):
            table.released(key)

    def _tables(self, attempt: LoginAttempt) -> list[tuple[BackOff, object]]:
        tables: list[tuple[BackOff, object]] = [
            (self.pairs, attempt.pair),
            (self.names, attempt.name),
        ]
        if attempt.by_address:
            tables.append((self.addresses, attempt.address))
        return tables


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
    def login_name_concurrency(self) -> int: ...
    @property
    def membership_rate(self) -> float: ...
    @property
    def membership_burst(self) -> int: ...
    @property
    def ack_rate(self) -> float: ...
    @property
    def ack_burst(self) -> int: ...
    @property
    def subscribe_rate(self) -> float: ...
    @property
    def subscribe_burst(self) -> int: ...
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
        # Joins and leaves share one bucket: churning between them is one abuse.
        self.memberships = RateLimiter(settings.membership_rate, settings.membership_burst)
        self.acks = RateLimiter(settings.ack_rate, settings.ack_burst)
        self.subscribes = RateLimiter(settings.subscribe_rate, settings.subscribe_burst)
        self.registrations = RateLimiter(settings.register_rate, settings.register_burst)
        self.logins = LoginGuard(
            settings.login_free_failures,
            settings.login_max_delay,
            settings.login_name_concurrency,
        )
        self.trusted = Networks(settings.trusted_networks)

    def reconfigure(self, settings: GuardSettings) -> None:
        """New limits (SIGHUP), keeping what each key has used so far."""
        for bucket, rate, burst in (
            (self.messages, settings.message_rate, settings.message_burst),
            (self.memberships, settings.membership_rate, settings.membership_burst),
            (self.acks, settings.ack_rate, settings.ack_burst),
            (self.subscribes, settings.subscribe_rate, settings.subscribe_burst),
            (self.registrations, settings.register_rate, settings.register_burst),
        ):
            bucket.rate, bucket.burst = rate, burst
        self.logins.reconfigure(
            settings.login_free_failures,
            settings.login_max_delay,
            settings.login_name_concurrency,
        )
        self.trusted = Networks(settings.trusted_networks)
