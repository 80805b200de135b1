"""Talking to systemd without libsystemd: readiness notification and socket activation.

Both protocols are small, stable and documented, so this module implements them
with the standard library only.

Readiness notification, ``sd_notify(3)``: systemd puts the path of a datagram
socket in ``NOTIFY_SOCKET``; the service sends it newline-separated
``KEY=VALUE`` assignments, one message per datagram, such as ``READY=1``
(``Type=notify`` units are "started" only then), ``STOPPING=1``,
``STATUS=free text`` (shown by ``systemctl status``) or
``RELOADING=1\\nMONOTONIC_USEC=...`` followed by ``READY=1`` around a reload.
A path starting with ``@`` names a socket in Linux's abstract namespace (the
``@`` stands for a leading NUL byte).  Without the variable the process is
not under a ``Type=notify`` unit and there is nobody to tell.

Socket activation, ``sd_listen_fds(3)``: systemd (or ``systemd-socket-activate``)
passes already-bound, listening sockets as file descriptors 3, 4, ...
(``SD_LISTEN_FDS_START``), says how many in ``LISTEN_FDS`` and whom they are
for in ``LISTEN_PID`` -- the variables may have been inherited by a child
that they are not meant for, hence the pid check.  ``LISTEN_FDNAMES`` holds
optional names (``FileDescriptorName=``).  Like libsystemd, this module
marks the descriptors close-on-exec and removes the three variables so that
children do not take the sockets for theirs.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Mapping

__all__ = ["SD_LISTEN_FDS_START", "listen_sockets", "monotonic_usec", "notify"]

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# NOTIFY_SOCKET values already warned about: a broken socket is reported once,
# not on every STATUS= update.
_warned: set[str] = set()


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager, as ``sd_notify(3)`` does.

    Returns False when not run by a ``Type=notify`` unit (no ``NOTIFY_SOCKET``) or when
    the message could not be sent, True once it was.  Never raises for a missing,
    refused or full socket: it logs a warning, once per socket, and carries on, since a
    service must not fail because its manager went away.  Never blocks either (a full
    receive queue is such a failure), so it is safe to call from the event loop.
    """
    if not state:
        raise ValueError("notify() needs a state such as 'READY=1'")
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    try:
        if path.startswith("@"):  # Linux abstract namespace
            address = b"\0" + os.fsencode(path[1:])
        elif path.startswith("/"):
            address = os.fsencode(path)
        else:  # e.g. systemd 253's "vsock:CID:PORT", which is not for a service on the host
            raise ValueError("not an absolute path or @abstract name")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode(), socket.MSG_NOSIGNAL, address)
    except (OSError, ValueError) as exc:  # ValueError covers UnicodeEncodeError
        if path not in _warned:
            _warned.add(path)
            log.warning("cannot notify systemd at NOTIFY_SOCKET=%r: %s", path, exc)
        return False
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for ``RELOADING=1\\nMONOTONIC_USEC=...``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def listen_sockets(
    environ: Mapping[str, str] = os.environ, unset: bool = True
) -> list[socket.socket]:
    """The sockets systemd passed to this process (``sd_listen_fds(3)``), else ``[]``.

    Each descriptor from ``SD_LISTEN_FDS_START`` on is made close-on-exec and wrapped
    in a ``socket.socket`` (family and type come from the descriptor).  Invalid
    variables, or descriptors that are not open, give ``[]`` and a warning; a
    descriptor that is not a socket (``ListenFIFO=`` and the like) is left alone with
    a warning.  When ``unset`` and ``environ`` is ``os.environ``, the variables are
    removed whatever the outcome, as libsystemd does.
    """
    try:
        return _listen_sockets(environ)
    finally:
        if unset and environ is os.environ:
            for name in _LISTEN_VARIABLES:
                os.environ.pop(name, None)


def _listen_sockets(environ: Mapping[str, str]) -> list[socket.socket]:
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        return []
    pid = _parse_count(pid_text)
    if pid is None or pid == 0:
        log.warning("ignoring socket activation: LISTEN_PID=%r is not a pid", pid_text)
        return []
    if pid != os.getpid():
        log.debug("LISTEN_PID=%d is not this process (%d)", pid, os.getpid())
        return []
    fds_text = environ.get("LISTEN_FDS")
    count = None if fds_text is None else _parse_count(fds_text)
    if not count:  # None or 0: systemd never sets LISTEN_FDS=0
        log.warning("ignoring socket activation: LISTEN_FDS=%r is not a count", fds_text)
        return []
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    for fd in fds:  # all or nothing; stops at the first hole, even for a huge count
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            log.warning("ignoring socket activation: LISTEN_FDS=%d but fd %d: %s", count, fd, exc)
            return []
    sockets = []
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError("not a socket")
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            log.warning("ignoring fd %d passed by systemd: %s", fd, exc)
    return sockets


def _parse_count(text: str) -> int | None:
    """A non-negative decimal integer in ASCII digits only (``int()`` also takes ``" +1_0"``)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        return None
    return int(text)
