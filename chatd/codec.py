"""Frames: a 4-byte big-endian body length, then one msgpack body (protocol.md, "Framing").

Sans-I/O: bytes go in, decoded bodies come out.  Nothing here knows about
sockets or asyncio, so the server, the client library and the tests share it.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from chatd.errors import FrameTooLarge

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME_SIZE = 65536


@dataclass(frozen=True)
class Malformed:
    """A frame whose body is not valid msgpack; the stream itself is still in sync."""

    reason: str


@dataclass(frozen=True)
class Oversize:
    """A length header over the limit: always the last item, the stream is lost after it."""

    length: int
    limit: int

    @property
    def reason(self) -> str:
        return f"frame of {self.length} bytes is over the limit of {self.limit} bytes"


_local = threading.local()


def encode_frame(body: Any) -> bytes:
    """Serialise ``body`` and prefix it with its length."""
    # One Packer per thread, reused: half the cost of msgpack.packb, which makes one
    # per call (and it runs twice per message: the reply and the push).
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    payload: bytes = packer.pack(body)
    return HEADER.pack(len(payload)) + payload


def decode_body(payload: bytes | memoryview) -> Any:
    """Decode one frame body; every failure becomes ``Malformed``.

    ``msgpack`` may raise more than its own exception types on hostile input
    (its ``exceptions.py`` says so), hence the broad ``except``.
    """
    try:
        return _unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        return _malformed(exc, len(payload))


_unpackb = msgpack.unpackb
# msgpack's defaults since 1.0 (setup.cfg asks for 1.0.5) are decode_body's options: the
# hot loop passes none, as keyword arguments cost a parse per frame (tests/test_codec.py
# checks the defaults).


def _malformed(exc: Exception, size: int) -> Malformed:
    return Malformed(undecodable(exc, size))


def undecodable(exc: Exception, size: int) -> str:
    """Why a body of ``size`` bytes did not decode, in the client's terms: which rule of
    protocol.md's "Framing" it broke, never the decoder's exception."""
    if size == 0:
        return "frame body is empty: a request is one msgpack map"
    if isinstance(exc, msgpack.ExtraData):
        return "frame body has bytes after its msgpack value: one value per frame"
    if isinstance(exc, UnicodeDecodeError):
        return "frame body has a string that is not valid UTF-8"
    if isinstance(exc, msgpack.StackError):
        return "frame body is nested too deeply"
    # msgpack says these two only in the text of a plain ValueError (both its C and
    # its pure-Python unpacker); anything else gets the general answer.
    text = str(exc)
    if "not allowed for map key" in text:
        return "frame body has a map key that is not a string"
    if "incomplete input" in text:
        return "frame body ends in the middle of a msgpack value"
    return "frame body is not valid msgpack"


class FrameDecoder:
    """Cuts frames out of a byte stream fed in arbitrary pieces.

    ``feed`` returns the bodies completed by the new bytes, decoded, in order;
    a body that does not decode comes out as :class:`Malformed`.  A length
    header over ``max_frame_size`` comes out as :class:`Oversize` before any of
    that body is buffered, ends the list, and makes every later ``feed`` raise
    :class:`FrameTooLarge`: the stream can no longer be trusted.

    With a ``limit``, at most that many bodies come out; the whole frames left
    are kept undecoded (``pending``) and come out of the next calls, ``feed(b"",
    limit)``, before any new bytes. The server uses it to do a bounded amount of
    work per connection at a time: a 64 KiB read can hold ten thousand frames.
    """

    __slots__ = (
        "_buffer", "_failed", "_needed", "_rest", "_rest_at", "_unpack", "max_frame_size"
    )

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        unpack: Callable[[bytes], Any] | None = None,
    ) -> None:
        self.max_frame_size = max_frame_size
        # Decodes one body; by default msgpack as protocol.md says. An exception from it
        # makes the body Malformed. (A load generator that reads the same frames on many
        # connections may memoize it.)
        self._unpack = unpack
        # Made only while a frame is unfinished: ten thousand idle connections hold none.
        self._buffer: bytearray | None = None
        self._needed = 0  # bytes the buffer must hold before its first frame is whole
        # Bytes fed whose frames were held back by a limit: they start at _rest_at. Kept
        # as fed, not copied: a limit of 64 over a 64 KiB read would copy it 50 times.
        self._rest: bytes | None = None
        self._rest_at = 0
        self._failed = False

    @property
    def unpack(self) -> Callable[[bytes], Any] | None:
        return self._unpack

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return 0 if self._buffer is None else len(self._buffer)

    @property
    def pending(self) -> bool:
        """Bytes held back by a ``limit``: ``feed(b"", limit)`` hands out their frames."""
        return self._rest is not None

    @property
    def held(self) -> int:
        """Every byte held: the undecoded rest of what was fed, and an unfinished frame."""
        rest = 0 if self._rest is None else len(self._rest) - self._rest_at
        return rest + self.buffered

    def feed(self, data: bytes, limit: int | None = None) -> list[Any]:
        if self._failed:
            raise FrameTooLarge("stream already failed")
        offset = 0
        if self._rest is not None:  # frames held back by a limit come first
            data, offset = self._take_rest(data)
        elif self._buffer is not None:  # the end of a frame split across reads
            self._buffer += data
            if len(self._buffer) < self._needed:
                # Not decoded again until it can be whole: a large frame dripped in
                # byte by byte costs one copy per byte, not one of the whole buffer.
                return []
            data, self._buffer = bytes(self._buffer), None
        size = len(data)
        if not offset and size >= HEADER_SIZE and (limit is None or limit > 0):
            (length,) = HEADER.unpack_from(data)
            if length + HEADER_SIZE == size and length <= self.max_frame_size:
                # Exactly one whole frame: a paced client's read, taken without the loop.
                unpack = self._unpack
                try:
                    if unpack is None:
                        return [_unpackb(data[HEADER_SIZE:])]
                    return [unpack(data[HEADER_SIZE:])]
                except Exception as exc:  # as in decode_body
                    return [_malformed(exc, length)]
        # The hot loop of the server and of every client: locals, no helper calls, and
        # bodies sliced off as bytes (cheaper than memoryview slices that must be released).
        bodies: list[Any] = []
        unpack_header, limit_size, unpack = HEADER.unpack_from, self.max_frame_size, self._unpack
        most = sys.maxsize if limit is None else limit
        end = HEADER_SIZE
        while size - offset >= HEADER_SIZE:
            if len(bodies) >= most:
                self._rest, self._rest_at = data, offset
                return bodies
            (length,) = unpack_header(data, offset)
            if length > limit_size:
                self._failed = True
                bodies.append(Oversize(length, limit_size))
                return bodies  # the rest is not buffered: the stream is lost
            start = offset + HEADER_SIZE
            end = start + length
            if end > size:
                break
            try:
                body = data[start:end]
                if unpack is None:
                    bodies.append(_unpackb(body))  # decode_body's options: msgpack's defaults
                else:
                    bodies.append(unpack(body))
            except Exception as exc:  # as in decode_body, written out: this is the hot loop
                bodies.append(_malformed(exc, length))
            offset = end
        if offset < size:
            self._buffer = bytearray(memoryview(data)[offset:])
            self._needed = end - offset if end > size else HEADER_SIZE
        return bodies

    def _take_rest(self, data: bytes) -> tuple[bytes, int]:
        """The bytes held back by a limit, then ``data``, and where decoding resumes."""
        rest, at = self._rest, self._rest_at
        assert rest is not None
        self._rest = None
        if not data:
            return rest, at
        return rest[at:] + data, 0  # more fed before the rest was taken: rare, so copied
