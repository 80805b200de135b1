"""The per-client I/O layer: reading, writing, backpressure and timeouts, nothing else.

Requests on one connection are handled one after another, so replies come
back in request order (protocol.md, "Connection lifecycle").  Pushed events
are written without waiting; a client that lets more than
``max_outbound_buffer`` bytes pile up is dropped rather than buffered without
bound, and what it missed stays unacknowledged in the store for later.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from chatd import events
from chatd.app import Pending
from chatd.codec import FrameDecoder, Oversize, encode_frame
from chatd.config import Config
from chatd.errors import ErrorCode
from chatd.hub import Session
from chatd.metrics import Metrics
from chatd.model import PING, Event
from chatd.streams import PEER_ERRORS, LeanStreamReader

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
# Requests one connection may have handled before the event loop gets a turn (and with it
# every other connection). Most requests never suspend (/ping, errors, sends that only
# queue their message), so without it a 180 KB burst of 10,000 pings ran in one slice of
# the loop and held every other client up for half a second. A ping costs about 7 us, so
# 16 make a turn of about 0.1 ms: another client waits a turn or two, well within its
# quiet round trip (0.15-0.5 ms). Giving the loop a turn costs a few microseconds, so
# the flood itself was served as fast with 16 as with 64 (docs/benchmarks.md, "hostile").
# A read that fills READ_CHUNK ends the turn too: a turn handles at most one read's bytes.
TURN_FRAMES = 16

Reply = dict[str, Any]
# A frame body in; its reply, or a pending one (a send waiting for its commit), out.
BodyHandler = Callable[[Session, Any], Awaitable[Reply | Pending]]
# Where a handler hands its replies, in request order (the connection's reply queue).
PutReply = Callable[[Reply | Pending], Awaitable[None]]
# The frame bodies of one read in, each one's reply handed to PutReply; returns how many
# were refused with code 8, and stops at the budget given (App.handle_many).
BodiesHandler = Callable[[Session, list[Any], PutReply, int], Awaitable[int]]
# asyncio's default high-water mark: below it StreamWriter.drain() returns at once.
DRAIN_ABOVE = 64 * 1024
# Replies waiting to be written per connection; beyond it the connection stops reading.
PIPELINE_DEPTH = 512
WRITE_BATCH = 256  # replies joined into one write
# Timed-out reads ended per turn of the event loop. Ending one costs 0.1-0.2 ms (the
# task wakes, logs, closes its transport, leaves the hub): 5,000 connections reaching
# auth_timeout together held the loop for 0.12-0.56 s when all went in one tick. 32 a
# turn hold it a few milliseconds, and 5,000 still go within a fraction of a second.
TIMEOUT_BATCH = 32
# Why a read was interrupted.
SHUTDOWN = "shutdown"
TIMED_OUT = "timed out"


class Connection(Session):
    __slots__ = (
        "_closing",
        "_config",
        "_decoder",
        "_direct",
        "_dropped",
        "_frame_started",
        "_handle_bodies",
        "_idle",
        "_metrics",
        "_opened_at",
        "_paced_in_flight",
        "_pushes",
        "_queue",
        "_rate_limited",
        "_read_deadline",
        "_read_ends_connection",
        "_read_timer",
        "_reader",
        "_task",
        "_transport",
        "_turn_frames",
        "_wakeup",
        "_was_bound",
        "_writer",
    )

    def __init__(
        self,
        reader: LeanStreamReader,
        writer: asyncio.StreamWriter,
        config: Config,
        handle_bodies: BodiesHandler,
        metrics: Metrics,
        read_timer: ReadTimer,
    ) -> None:
        super().__init__(*_peer(writer.get_extra_info("peername")))
        self._reader = reader
        self._writer = writer
        # Written to directly: StreamWriter.write() and is_closing() only pass the call on,
        # and a paced message makes five of them.
        self._transport = writer.transport
        self._config = config
        self._handle_bodies = handle_bodies
        self._metrics = metrics
        self._decoder = FrameDecoder(config.max_frame_size)
        self._closing = False
        self._idle = False  # waiting for input, no request in flight
        self._task: asyncio.Task[None] | None = None  # the one running _run()
        self._read_timer = read_timer
        self._read_deadline = 0.0  # when the read in progress times out (time.monotonic)
        self._wakeup: str | None = None  # why the read in progress was interrupted
        # Why the connection closes if the read times out (a frame or login deadline);
        # None when the timeout is the idle or ping one.
        self._read_ends_connection: str | None = None
        self._dropped: str | None = None
        self._paced_in_flight = 0  # bytes of replies and catch-up frames being sent
        self._opened_at = time.monotonic()
        self._frame_started: float | None = None  # when the unfinished frame began
        self._rate_limited = 0  # code 8 replies so far
        self._was_bound = False  # logged in (or token-bound) at some point
        # Made on the first reply that has to wait its turn: idle connections stay small.
        self._queue: _ReplyQueue | None = None
        # The one reply owed, when nothing else is: written by whatever makes it ready
        # (_reply_ready), not by the queue's task. Set only while the queue is idle.
        self._direct: Pending | None = None
        self._pushes: list[bytes] | None = None  # pushed this turn, written at its end
        self._turn_frames = 0  # requests handled since the event loop last had a turn

    def start(self, closed: Callable[[Connection, str], None]) -> None:
        """Serve in a task of its own; ``closed(self, why)`` is called when it ends."""
        self._task = asyncio.create_task(self._run(closed))

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def _run(self, closed: Callable[[Connection, str], None]) -> None:
        """Serve until the peer leaves, misbehaves, times out, or the server shuts down,
        then tell ``closed`` why: peer, shutdown, oversize, abuse, timeout, error or
        dropped (a slow or stalled client).

        The read loop is written out here, not in a coroutine of its own: every
        coroutine frame suspended under an idle connection costs 250 bytes, times ten
        thousand. Nor is there a done-callback on the task (its partial and context
        cost 300 more): ``closed`` is called from the ``finally`` below.
        """
        reason = "shutdown"  # if cancelled: only the server's last resort does that
        try:
            try:
                pinged = False
                while not self._closing:
                    self._start_read(pinged)
                    reader = self._reader
                    try:
                        # The reader's future awaited here, not a read() coroutine: one
                        # frame less under every idle connection (chatd/streams.py).
                        got = reader.read_now(READ_CHUNK)
                        while not isinstance(got, bytes):
                            await got
                            got = reader.read_now(READ_CHUNK)
                        data: bytes | None = got
                    except asyncio.CancelledError:
                        if self._wakeup is None:
                            raise  # cancelled by someone else: the server's last resort
                        data = self._interrupted()
                    finally:
                        self._idle = False
                        self._read_timer.waiting.discard(self)  # unwatch(), a call less
                    if data is None:  # the read timed out
                        pinged = self._read_timed_out(pinged)
                        continue
                    if not data:
                        reason = "shutdown" if self._closing else "peer"
                        break
                    pinged = False
                    stop = await self._handle_bytes(data)
                    del data  # not held while the connection waits for more
                    if stop is not None:
                        reason = stop
                        break
            except TimeoutError:
                reason = "timeout"
            if self._direct is not None:  # the queue waits for it, with a timeout
                self._hand_over_direct()
            if self._queue is not None:  # what was read and done is answered before closing
                await self._queue.finish(self._config.write_timeout)
        except (*PEER_ERRORS, asyncio.IncompleteReadError) as exc:
            reason = "error"
            self._dropped = self._dropped or f"connection error ({type(exc).__name__})"
        except asyncio.CancelledError:
            reason = "shutdown"
            raise
        except Exception:
            log.exception("connection %s failed", self)
            reason = "error"
        finally:
            closed(self, self._close(reason))

    def _close(self, reason: str) -> str:
        """Release the connection; returns why it ended, as _run() reports it."""
        self._direct = None
        if self._queue is not None:
            self._queue.discard()
        self._writer.close()
        log.info("connection closed %s: %s", self, self._dropped or reason)
        if reason == "peer" and self._dropped is not None:
            return "dropped"  # abort() made the read see end of stream
        return reason

    def reconfigure(self, config: Config) -> None:
        """New limits and timeouts (SIGHUP); the frame size limit stays as it was."""
        self._config = config

    def shutdown(self) -> None:
        """Finish the request in flight, if any, then close."""
        self._closing = True
        if self._idle:
            # Ends the pending read; replies still owed are written first. Not
            # feed_eof(): bytes arriving after it are a fatal error in feed_data(),
            # and set_exception() would fail the writes too.
            self.interrupt_read(SHUTDOWN)

    def interrupt_read(self, why: str) -> None:
        """End the read in progress early: on shutdown, or when its deadline passed."""
        if self._idle and self._wakeup is None and self._task is not None:
            self._wakeup = why
            self._task.cancel()  # caught in _run, which knows why from _wakeup

    @property
    def read_deadline(self) -> float:
        return self._read_deadline

    def write(self, event: Event) -> None:
        """Queue a pushed event without waiting; drop a client that does not read.

        The event is encoded here, at the edge, and only once for every connection
        it goes to (events.frame). Pushes made in one turn of the event loop leave in
        one write: a busy channel costs one system call per member per turn, not one
        per message.
        """
        frame = event.msgpack_frame  # read here: the call costs more than the read
        if frame is None:
            frame = events.frame(event)
        pushes = self._pushes
        if pushes is not None:
            pushes.append(frame)  # a closing writer is noticed by the flush, once a turn
        elif not self._transport.is_closing():
            self._pushes = [frame]
            batch = self.pushes
            if batch is not None and batch.open:  # a commit's messages being published
                batch.flushes.append(self._flush_pushes)  # written once they all are
            else:
                # The task's loop, not get_running_loop(): that makes a system call (getpid).
                self._loop().call_soon(self._flush_pushes)

    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop() if self._task is None else self._task.get_loop()

    def _flush_pushes(self) -> None:
        frames, self._pushes = self._pushes, None
        transport = self._transport
        if not frames or transport.is_closing():
            return
        transport.write(b"".join(frames))
        self._metrics.pushed(len(frames))  # counted here: once per write, not per event
        # Frames written at the client's pace (replies, catch-up) are not the client's
        # fault: only what piles up beyond them counts.
        pushed = transport.get_write_buffer_size() - self._paced_in_flight
        if pushed > self._config.max_outbound_buffer:
            self.abort("dropped: outbound buffer full (client not reading)")

    @property
    def held_request_bytes(self) -> int:
        """Bytes of requests read from the socket but not yet handled: at most one read
        (READ_CHUNK), and the start of a frame that read finishes."""
        return self._decoder.held

    @property
    def queued_bytes(self) -> int:
        return self._transport.get_write_buffer_size()

    def abort(self, reason: str) -> None:
        self._dropped = self._dropped or reason
        self._transport.abort()
        # The read in progress, if any, must end too: a reset peer may never send EOF.
        self._reader.feed_eof()

    async def drain(self) -> None:
        if self._transport.get_write_buffer_size() <= DRAIN_ABOVE:
            return  # nothing to wait for: skip setting up a timeout on the hot path
        # A client that stops reading stops being read (backpressure),
        # and is dropped when it stalls longer than write_timeout.
        async with asyncio.timeout(self._config.write_timeout):
            await self._writer.drain()

    async def push_paced(self, event: Event) -> None:
        frame = events.frame(event)
        self._metrics.pushed()
        await self.send(frame)

    async def send(self, frame: bytes) -> None:
        """Write a frame and wait until the client has taken most of what is queued."""
        if self._transport.is_closing():
            # uvloop raises RuntimeError on a closed transport: say what it means.
            raise ConnectionResetError("the connection is closed")
        self._paced_in_flight += len(frame)
        try:
            self._transport.write(frame)
            await self.drain()
        finally:
            self._paced_in_flight -= len(frame)

    async def _handle_bytes(self, data: bytes) -> str | None:
        """Answer the frames completed by data, TURN_FRAMES at a time; returns why to
        close, if it must be.

        Frames beyond the turn's budget stay undecoded in the decoder, and the connection
        reads nothing more until they are handled: a client pipelining without bound is
        held back by TCP (the reader's buffer fills and the transport stops reading).
        """
        decoder = self._decoder
        progressed = False
        chunk = data
        while True:
            bodies = decoder.feed(chunk, TURN_FRAMES - self._turn_frames)
            chunk = b""
            if bodies:
                # Handled here, not in a coroutine of its own: a paced message is one
                # read of one frame, and every await of a new coroutine costs.
                progressed = True
                self._turn_frames += len(bodies)
                budget = self._config.abuse_limit - self._rate_limited
                self._rate_limited += await self._handle_bodies(
                    self, bodies, self._queue_reply, budget
                )
                last = bodies[-1]
                if self._rate_limited >= self._config.abuse_limit or isinstance(last, Oversize):
                    return self._stop_after(last)
            if not decoder.pending:
                break
            await self._next_turn()  # the budget ran out with frames left
        # The frame clock: started on an unfinished frame, restarted by a finished one.
        if not decoder.buffered:
            self._frame_started = None
        elif self._frame_started is None or progressed:
            self._frame_started = time.monotonic()
        if len(data) < READ_CHUNK:
            # A short read emptied the reader's buffer: the next read waits for the loop
            # (or a request already waited), so that is a turn given away already.
            self._turn_frames = 0
        else:
            await self._next_turn()  # more bytes wait: the others go first
        return None

    def _stop_after(self, last: Any) -> str:
        """Why to close: past the rate limits, or the read's ``last`` body is Oversize."""
        if self._rate_limited >= self._config.abuse_limit:  # the handler stopped there
            self._dropped = "dropped: kept going past the rate limits"
            return "abuse"
        assert isinstance(last, Oversize)  # always the last: the stream is lost after it
        self._dropped = last.reason
        return "oversize"

    async def _next_turn(self) -> None:
        """Let every other ready task and callback of the event loop run first."""
        self._turn_frames = 0
        await asyncio.sleep(0)

    async def _queue_reply(self, reply: Reply | Pending) -> None:
        """Replies go out in request order, while later requests are already being read.

        With nothing owed before it, a reply needs no queue: one known now is written
        now, and one known once its sends are committed (a paced message's) is written
        by the commit's settle (_reply_ready), without waking a task for it. Anything
        more goes through the queue, the reply owed first.
        """
        queue = self._queue
        if self._direct is None and (queue is None or queue.idle):
            if isinstance(reply, dict):
                await self.send(encode_frame(reply))
                return
            if reply.on_ready(self._reply_ready):
                self._direct = reply
                return
            if reply.ready:  # nothing to wait for (errors only, say)
                await self.send(b"".join(reply.frames()))
                return
        if queue is None:
            queue = self._queue = _ReplyQueue(self)
        if self._direct is not None:
            self._hand_over_direct()
        await queue.put(reply)

    def _reply_ready(self, reply: Pending) -> None:
        """The direct reply is ready (called by its settle): write it, as send() would
        without having to wait; a client that is behind gets it through the queue,
        which waits for the client to read (backpressure)."""
        if self._direct is not reply:
            return  # handed over to the queue meanwhile, or the connection closed
        data = b"".join(reply.frames())
        transport = self._transport
        if transport.is_closing():
            self._direct = None
            self.abort("dropped: cannot write replies (ConnectionResetError)")  # as the queue
        elif transport.get_write_buffer_size() + len(data) <= DRAIN_ABOVE:
            self._direct = None
            transport.write(data)
        else:
            self._hand_over_direct()

    def _hand_over_direct(self) -> None:
        """The direct reply goes to the queue: it is owed before anything queued next."""
        direct, self._direct = self._direct, None
        assert direct is not None
        if self._queue is None:
            self._queue = _ReplyQueue(self)
        self._queue.put_nowait(direct)

    def _start_read(self, pinged: bool) -> None:
        """Arm the deadline of the next read: the idle, ping, frame or login timeout."""
        config = self._config
        if self.subscription is None:
            timeout = config.idle_timeout
        else:
            timeout = config.ping_timeout if pinged else config.ping_interval
        now = time.monotonic()
        if self._frame_started is None and (self._was_bound or self.user_id is not None):
            # Logged in, between frames (every read of a paced client): no hard deadline.
            self._was_bound = True
            self._read_ends_connection = None
            self._read_deadline = now + timeout
        else:
            deadline, why = self._hard_deadline(now)
            if deadline <= 0:  # checked first: a chatty peer's reads never time out
                self._dropped = why
                raise TimeoutError(why)
            self._read_ends_connection = why if deadline <= timeout else None
            self._read_deadline = now + min(timeout, deadline)
        self._idle = True
        self._read_timer.watch(self)

    def _interrupted(self) -> bytes | None:
        """After interrupt_read(): b"" on shutdown, None on a timeout."""
        woken, self._wakeup = self._wakeup, None
        self._task.uncancel()  # type: ignore[union-attr]  # interrupt_read() cancelled it
        return None if woken == TIMED_OUT else b""

    def _read_timed_out(self, pinged: bool) -> bool:
        """Close on a passed deadline, or ping a subscribed client once (returns True)."""
        if self._read_ends_connection is not None:
            self._dropped = self._read_ends_connection
            raise TimeoutError(self._dropped)
        if self.subscription is None or pinged:
            raise TimeoutError("idle")
        self.write(PING)
        return True

    def _hard_deadline(self, now: float) -> tuple[float, str]:
        """Seconds left before a half-sent frame or a missing login closes the connection."""
        deadline, why = float("inf"), ""
        if self._frame_started is not None:
            deadline = self._frame_started + self._config.frame_timeout - now
            why = "dropped: frame left unfinished (frame_timeout)"
        if self.user_id is not None:
            self._was_bound = True
        elif not self._was_bound:  # only for connections that never logged in
            login_deadline = self._opened_at + self._config.auth_timeout - now
            if login_deadline < deadline:
                deadline, why = login_deadline, "dropped: never logged in (auth_timeout)"
        return max(deadline, 0.0), why


def one_by_one(handle_body: BodyHandler) -> BodiesHandler:
    """A BodiesHandler made of a handler of one body at a time (tests, other front-ends)."""

    async def handle_bodies(
        session: Session, bodies: list[Any], put: PutReply, budget: int
    ) -> int:
        refused = 0
        for body in bodies:
            reply = await handle_body(session, body)
            await put(reply)
            if isinstance(reply, dict) and reply.get("code") == ErrorCode.RATE_LIMITED:
                refused += 1
                if refused >= budget:
                    break
        return refused

    return handle_bodies


class ReadTimer:
    """One timer for every connection waiting for input, instead of one per read.

    Ten thousand idle connections would otherwise hold ten thousand timer handles,
    and a busy one would make and cancel a timer for every read. A read's deadline is
    noticed within ``resolution`` seconds of passing; when many pass together, their
    reads are ended TIMEOUT_BATCH per turn of the event loop, so that other
    connections are served in between.
    """

    def __init__(self, config: Config) -> None:
        self.waiting: set[Connection] = set()  # Connection._run leaves it without a call
        self._expired: list[Connection] = []  # found past their deadline, not yet ended
        self._handle: asyncio.Handle | None = None
        self.resolution = 1.0
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """A quarter of the shortest read timeout, at most a second."""
        shortest = min(
            config.frame_timeout,
            config.auth_timeout,
            config.idle_timeout,
            config.ping_interval,
            config.ping_timeout,
        )
        self.resolution = min(1.0, shortest / 4)

    def watch(self, connection: Connection) -> None:
        self.waiting.add(connection)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.resolution, self._tick)

    def unwatch(self, connection: Connection) -> None:
        self.waiting.discard(connection)

    def close(self) -> None:
        self._expired.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = None
        if not self._expired:
            now = time.monotonic()
            self._expired = [c for c in self.waiting if c.read_deadline <= now]
        self._interrupt_batch()
        loop = asyncio.get_running_loop()
        if self._expired:  # the rest in the next turn, after the loop has polled
            self._handle = loop.call_soon(self._tick)
        elif self.waiting:
            self._handle = loop.call_later(self.resolution, self._tick)

    def _interrupt_batch(self) -> None:
        """End up to TIMEOUT_BATCH of the expired reads; skip those that ended meanwhile."""
        now = time.monotonic()
        expired = self._expired
        for _ in range(min(TIMEOUT_BATCH, len(expired))):
            connection = expired.pop()
            # Still waiting on the same read? Data may have come since the scan.
            if connection in self.waiting and connection.read_deadline <= now:
                self.waiting.discard(connection)
                connection.interrupt_read(TIMED_OUT)


def _peer(peername: object) -> tuple[str, int | None]:
    """The client's address and port. The address is interned: the connections of one
    client (or of everyone behind one NAT) share a single string."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return sys.intern(str(peername[0])), int(peername[1])
    return ("-", None) if not peername else (sys.intern(str(peername)), None)


class _ReplyQueue:
    """Replies owed on one connection, written in request order as each becomes ready.

    Ready replies are joined into one write; past PIPELINE_DEPTH owed replies the
    connection stops reading until the client has taken some (backpressure).
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._replies: deque[Reply | Pending] = deque()
        self._owed = 0  # replies in _replies (a Pending may hold several)
        self._added = asyncio.Event()
        self._all_written = asyncio.Event()
        self._all_written.set()
        self._room: asyncio.Future[None] | None = None  # awaited while the queue is full
        self._writing = False  # holding replies taken from the queue but not yet written
        self._task = asyncio.create_task(self._write())

    @property
    def idle(self) -> bool:
        return not self._replies and not self._writing

    async def put(self, reply: Reply | Pending) -> None:
        while True:
            if self._task.done():  # a write failed: the connection is being closed
                raise ConnectionResetError("replies can no longer be written")
            if self._owed < PIPELINE_DEPTH:
                break
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        self.put_nowait(reply)

    def put_nowait(self, reply: Reply | Pending) -> None:
        """Queue a reply without checking for room: the one owed while the queue was
        idle (Connection._hand_over_direct), which put() let through already."""
        self._replies.append(reply)
        self._owed += reply.size if isinstance(reply, Pending) else 1
        self._all_written.clear()
        self._added.set()

    async def finish(self, timeout: float) -> None:
        """Wait until every owed reply is written (a stalled client is dropped)."""
        try:
            async with asyncio.timeout(timeout):
                await self._all_written.wait()
        except TimeoutError:
            self._connection.abort("dropped: replies not taken at close")

    def discard(self) -> None:
        self._task.cancel()
        self._replies.clear()  # nobody will read them; the messages stand all the same

    async def _write(self) -> None:
        while True:
            if not self._replies:
                self._added.clear()
                await self._added.wait()
            head = self._replies[0]
            if isinstance(head, Pending) and not head.ready:
                await head.wait()
            self._writing = True
            frames = self._take_ready()
            if self._room is not None and not self._room.done():
                self._room.set_result(None)
            try:
                await self._connection.send(b"".join(frames))
            except (*PEER_ERRORS, TimeoutError) as exc:
                self._connection.abort(f"dropped: cannot write replies ({type(exc).__name__})")
                self._all_written.set()  # nothing more will be: stop waiting for it
                if self._room is not None and not self._room.done():
                    self._room.set_result(None)  # the reader finds the writer gone
                return
            finally:
                self._writing = False
            if not self._replies:
                self._all_written.set()

    def _take_ready(self) -> list[bytes]:
        frames: list[bytes] = []
        replies = self._replies
        while replies and len(frames) < WRITE_BATCH:
            item = replies[0]
            if type(item) is dict:
                frames.append(encode_frame(item))
                self._owed -= 1
            else:
                assert isinstance(item, Pending)
                if not item.ready:
                    break
                answers = item.frames()
                frames += answers
                self._owed -= len(answers)
            replies.popleft()
        return frames

