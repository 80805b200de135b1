"""The per-client I/O layer: reading, writing, backpressure and timeouts, nothing else.

Requests on one connection are handled one after another, so replies come
back in request order (protocol.md, "Connection lifecycle").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from chatd.codec import FrameDecoder, Oversize, encode_frame
from chatd.config import Config
from chatd.hub import Session

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024

BodyHandler = Callable[[Session, Any], Awaitable[dict[str, Any]]]


class Connection(Session):
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: Config,
        handle_body: BodyHandler,
    ) -> None:
        peername = writer.get_extra_info("peername")
        super().__init__(peer=_format_peer(peername))
        self._reader = reader
        self._writer = writer
        self._config = config
        self._handle_body = handle_body
        self._decoder = FrameDecoder(config.max_frame_size)
        self._closing = False
        self._idle = False  # waiting for input, no request in flight

    async def run(self) -> None:
        """Serve until the peer leaves, misbehaves, times out, or the server shuts down."""
        reason = "closed by peer"
        try:
            reason = await self._serve()
        except TimeoutError:
            reason = "timed out"
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            reason = f"connection error ({type(exc).__name__})"
        finally:
            self._writer.close()
            log.info("connection closed %s: %s", self.peer, reason)

    def shutdown(self) -> None:
        """Finish the request in flight, if any, then close."""
        self._closing = True
        if self._idle:
            self._writer.close()  # the pending read then sees end of stream

    async def _serve(self) -> str:
        while not self._closing:
            data = await self._read()
            if not data:
                return "shutdown" if self._closing else "closed by peer"
            for body in self._decoder.feed(data):
                await self._send(await self._handle_body(self, body))
                if isinstance(body, Oversize):
                    return body.reason
        return "shutdown"

    async def _read(self) -> bytes:
        self._idle = True
        try:
            async with asyncio.timeout(self._config.idle_timeout):
                return await self._reader.read(READ_CHUNK)
        finally:
            self._idle = False

    async def _send(self, message: dict[str, Any]) -> None:
        self._writer.write(encode_frame(message))
        # A client that stops reading its replies stops being read (backpressure),
        # and is dropped when it stalls longer than write_timeout.
        async with asyncio.timeout(self._config.write_timeout):
            await self._writer.drain()


def _format_peer(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername)
