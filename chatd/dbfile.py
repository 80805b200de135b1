"""The database file's guard rails at start-up: one server per file, no silent fresh start.

A lock file beside the database, ``<db>.lock``, is held with an exclusive flock by
the server for as long as it runs, so a second server on the same file is refused
(two would split live delivery between them).  The lock file is never deleted:
it also records that a database was created there, so that a database file gone
missing is not replaced by a new, empty one at the next start; ``chatd init`` is
the explicit way to start over.  A directory with neither file is a first start.

``chatd admin`` and ``chatd backup`` do not take the lock: they work beside a
running server (SQLite's own locks keep them consistent).  Everything here does
file I/O: call it off the event loop.
"""

from __future__ import annotations

import fcntl
import glob
import os
import time

from chatd.store import RESCUED_INFIX, StoreError

LOCK_SUFFIX = ".lock"
_HEADER = (
    "# chatd holds a lock on this file while it serves the database beside it.\n"
    "# Do not delete it: it also records that the database was created, so that\n"
    "# chatd never silently replaces a missing database with an empty one.\n"
)


class InstanceLock:
    """``<db>.lock``, locked by this process until ``release``."""

    def __init__(self, db: str, fd: int, fields: dict[str, str]) -> None:
        self.db = db
        self.path = db + LOCK_SUFFIX
        self._fd: int | None = fd
        self._fields = fields

    @classmethod
    def acquire(cls, db: str) -> InstanceLock:
        """Lock the database for this process; StoreError if another chatd has it."""
        path = db + LOCK_SUFFIX
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot open database {db}: cannot create its lock file {path}:"
                f" {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd).get("pid", "unknown")
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise StoreError(
                    f"another chatd is serving {db} (pid {holder}); stop it first, or give"
                    " this one its own --db"
                ) from exc
            raise StoreError(f"cannot lock {path}: {exc.strerror}") from exc
        lock = cls(db, fd, _read(fd))
        lock._fields["pid"] = str(os.getpid())
        lock._write()
        return lock

    @property
    def created(self) -> str | None:
        """When a database was first created (or found) here, as the lock file says."""
        return self._fields.get("created")

    def require_database(self) -> None:
        """Refuse to start where a database existed and is now missing.

        Without this SQLite would create a new, empty file, and the server would run
        on with every account and message gone.
        """
        if os.path.exists(self.db):
            return
        if self.created is not None:
            raise StoreError(
                f"database {self.db} is missing, but one was created there on {self.created}"
                f" ({self.path} says so). Restore it from a backup{_rescued_hint(self.db)},"
                " then start chatd again; or run `chatd init` to create a new, empty database"
            )
        if os.path.exists(self.db + "-wal"):
            raise StoreError(
                f"database {self.db} is missing but its write-ahead log {self.db}-wal is"
                " there: restore the database, or move the -wal and -shm files away"
            )

    def record_database(self) -> None:
        """Note that the database exists (once per place: the first date is kept)."""
        if self.created is None:
            self._fields["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self._write()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def _write(self) -> None:
        assert self._fd is not None
        body = "".join(f"{key}={value}\n" for key, value in self._fields.items())
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (_HEADER + body).encode(), 0)
        os.fsync(self._fd)  # the record of a created database must outlive a power cut


def _read(fd: int) -> dict[str, str]:
    """The key=value lines of a lock file (comments and anything else ignored)."""
    raw = os.pread(fd, 65536, 0).decode(errors="replace")
    fields = {}
    for line in raw.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


def _rescued_hint(db: str) -> str:
    copies = sorted(glob.glob(glob.escape(db) + RESCUED_INFIX + "*"))
    return f" (or the copy chatd saved when it was lost: {copies[-1]})" if copies else ""
