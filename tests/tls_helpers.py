"""TLS for the tests: a certificate made at test time (trustme), and a TLS client done
by hand, which can stop half-way or write bytes that are no TLS (tests/test_irc_fuzz.py,
tests/test_irc_live.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import trustme

READ_CHUNK = 65536


def certificate(directory: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A certificate and key for 127.0.0.1 (files in ``directory``: tls_cert, tls_key),
    and a client context that trusts it."""
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(cert_file)
    issued.private_key_pem.write_to_path(key_file)
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return cert_file, key_file, context


class RawTls:
    """TLS by hand over a plain TCP stream (ssl.MemoryBIO), so that a client can stop
    half-way, or write bytes that are no TLS, where asyncio's TLS would not let it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> RawTls:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, context)

    def _flush(self) -> None:
        self.writer.write(self.outgoing.read())

    def hello(self) -> None:
        """The handshake's first step: the ClientHello, sent."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self._flush()

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self.incoming.write(data)
        self._flush()

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    async def receive(self) -> bytes:
        """The next bytes the server sends, decrypted."""
        while True:
            try:
                return self.tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    raise ConnectionError("closed by the server") from None
                self.incoming.write(data)

    async def closed(self, within: float) -> bool:
        """Whether the server closes the connection within ``within`` seconds (what it
        sends meanwhile is read, unchecked)."""
        try:
            async with asyncio.timeout(within):
                while await self.reader.read(READ_CHUNK):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass  # a reset: closed too
        return True
