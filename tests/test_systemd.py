"""chatd.systemd against real sockets, child processes and ``systemd-analyze verify``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatd import systemd
from chatd.client import Client
from tests.conftest import ROOT, fast_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="systemd is Linux-only")

SCRIPTS = ROOT / "scripts"
TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def _forget_warnings() -> Iterator[None]:
    systemd._warned.clear()
    yield
    systemd._warned.clear()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notification socket, and its path."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(TIMEOUT)
        yield sock, path


# notify


def test_notify_sends_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1"


def test_notify_sends_several_assignments_as_one_datagram(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    state = f"RELOADING=1\nMONOTONIC_USEC={systemd.monotonic_usec()}\nSTATUS=reloading: ü"
    assert systemd.notify(state, {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == state.encode()
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"chatd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        assert systemd.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_uses_os_environ_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("STATUS=serving")
    assert sock.recv(4096) == b"STATUS=serving"


def test_notify_without_systemd_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    assert systemd.notify("READY=1", {}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": ""}) is False
    assert not caplog.records


@pytest.mark.parametrize(
    "make_path",
    [
        pytest.param(lambda tmp: str(tmp / "missing"), id="no such file"),
        pytest.param(lambda tmp: str(tmp), id="a directory"),
        pytest.param(lambda tmp: "relative/notify", id="relative"),
        pytest.param(lambda tmp: "vsock:2:1234", id="vsock"),
        pytest.param(lambda tmp: "/" + "x" * 200, id="too long"),
        pytest.param(lambda tmp: "@chatd-nobody-" + uuid.uuid4().hex, id="abstract, unbound"),
    ],
)
def test_notify_to_a_broken_socket_warns_once_and_returns_false(
    make_path: Callable[[Path], str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_path(tmp_path)
    with caplog.at_level(logging.WARNING, logger="chatd.systemd"):
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": path}) is False
        assert systemd.notify("STATUS=still here", {"NOTIFY_SOCKET": path}) is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "NOTIFY_SOCKET" in caplog.records[0].getMessage()


def test_notify_to_a_socket_bound_by_someone_else_fails_without_raising(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # wrong type
        sock.bind(str(path))
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(path)}) is False


def test_notify_never_blocks_on_a_full_queue(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver  # never read: its queue fills after a few datagrams
    started = time.monotonic()
    results = [systemd.notify("STATUS=" + "x" * 1000, {"NOTIFY_SOCKET": path}) for _ in range(500)]
    assert results[0] is True
    assert results[-1] is False
    assert time.monotonic() - started < TIMEOUT


def test_notify_rejects_an_empty_state() -> None:
    with pytest.raises(ValueError):
        systemd.notify("", {"NOTIFY_SOCKET": "/run/systemd/notify"})


def test_monotonic_usec_is_clock_monotonic_in_microseconds() -> None:
    before = time.monotonic_ns() // 1000
    value = systemd.monotonic_usec()
    after = time.monotonic_ns() // 1000
    assert before <= value <= after


# listen_sockets, in this process: only cases that must not touch fd 3


def test_listen_sockets_without_variables_is_empty(caplog: pytest.LogCaptureFixture) -> None:
    assert systemd.listen_sockets({}) == []
    assert systemd.listen_sockets({"LISTEN_FDS": "1"}) == []
    assert not caplog.records


def test_listen_sockets_for_another_process_is_empty(caplog: pytest.LogCaptureFixture) -> None:
    other = os.getppid()
    assert systemd.listen_sockets({"LISTEN_PID": str(other), "LISTEN_FDS": "1"}) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("pid", "fds"),
    [
        ("abc", "1"),
        ("", "1"),
        ("0", "1"),
        ("-1", "1"),
        (" {pid}", "1"),
        ("{pid}", None),
        ("{pid}", "x"),
        ("{pid}", "0"),
        ("{pid}", "-1"),
        ("{pid}", "+1"),
        ("{pid}", "1_0"),
        ("{pid}", "\u0661"),  # ARABIC-INDIC DIGIT ONE: int() takes it
        ("{pid}", "9" * 40),
    ],
)
def test_listen_sockets_with_garbage_is_empty_and_warns(
    pid: str, fds: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    environ = {"LISTEN_PID": pid.format(pid=os.getpid())}
    if fds is not None:
        environ["LISTEN_FDS"] = fds
    with caplog.at_level(logging.WARNING, logger="chatd.systemd"):
        assert systemd.listen_sockets(environ) == []
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_listen_sockets_unsets_os_environ_even_when_not_for_us(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "chatd")
    assert systemd.listen_sockets() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & os.environ.keys()


def test_listen_sockets_leaves_os_environ_when_asked_or_given_another_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_sockets(unset=False) == []
    assert systemd.listen_sockets(dict(os.environ)) == []
    assert os.environ["LISTEN_PID"] == str(os.getppid())
    assert os.environ["LISTEN_FDS"] == "1"


# listen_sockets, for real: a child process inherits descriptors at 3, 4, ...

# The child moves what it inherited to fds 3.. (as systemd would place them), sets
# LISTEN_PID to its own pid (which its parent cannot know in advance), calls
# listen_sockets() and reports on what it got.  Each listening socket it gets, it
# accepts the connection the parent queued before spawning it and answers b"ok".
CHILD = """
import fcntl, json, logging, os, socket, sys
logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(message)s")
inherited = json.loads(sys.argv[1])
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in inherited]
for fd in inherited:
    os.close(fd)
for target, fd in enumerate(parked, start=3):
    os.dup2(fd, target)  # inheritable, as systemd leaves them
    os.close(fd)
os.environ.update(json.loads(sys.argv[2]))
os.environ["LISTEN_PID"] = str(os.getpid())
from chatd.systemd import listen_sockets
sockets = listen_sockets()
report = {
    "sockets": [],
    "inheritable": [os.get_inheritable(3 + i) for i in range(len(inherited))],
    "environ": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
for sock in sockets:
    report["sockets"].append({
        "fd": sock.fileno(), "family": sock.family.name, "type": sock.type.name,
        "name": sock.getsockname(),
    })
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.settimeout(10)
        conn, _ = sock.accept()
        conn.sendall(b"ok")
        conn.close()
print(json.dumps(report))
"""


def run_child(fds: list[int], environ: dict[str, str]) -> tuple[dict[str, object], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(fds), json.dumps(environ)],
        pass_fds=fds, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, object] = json.loads(proc.stdout)
    return report, proc.stderr


def listening(family: socket.AddressFamily, address: tuple[str, int] | str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen()
    return sock


def queued_client(family: socket.AddressFamily, address: tuple[str, int] | str) -> socket.socket:
    """Connected before the child starts: the connection waits in the backlog."""
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    client.connect(address)
    return client


def test_listen_sockets_takes_an_inherited_tcp_listener() -> None:
    with listening(socket.AF_INET, ("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with queued_client(socket.AF_INET, ("127.0.0.1", port)) as client:
            report, stderr = run_child(
                [server.fileno()], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "chatd"}
            )
            assert client.recv(16) == b"ok"  # the child accepted on the very same socket
    assert report == {
        "sockets": [
            {"fd": 3, "family": "AF_INET", "type": "SOCK_STREAM", "name": ["127.0.0.1", port]}
        ],
        "inheritable": [False],
        "environ": [],
    }
    assert not stderr


def test_listen_sockets_takes_several_in_order(tmp_path: Path) -> None:
    path = str(tmp_path / "chatd.sock")
    with (
        listening(socket.AF_INET, ("127.0.0.1", 0)) as tcp,
        listening(socket.AF_UNIX, path) as unix,
    ):
        port = tcp.getsockname()[1]
        with (
            queued_client(socket.AF_INET, ("127.0.0.1", port)) as tcp_client,
            queued_client(socket.AF_UNIX, path) as unix_client,
        ):
            report, _ = run_child([tcp.fileno(), unix.fileno()], {"LISTEN_FDS": "2"})
            assert tcp_client.recv(16) == b"ok"
            assert unix_client.recv(16) == b"ok"
    assert report["sockets"] == [
        {"fd": 3, "family": "AF_INET", "type": "SOCK_STREAM", "name": ["127.0.0.1", port]},
        {"fd": 4, "family": "AF_UNIX", "type": "SOCK_STREAM", "name": path},
    ]
    assert report["inheritable"] == [False, False]


def test_listen_sockets_with_a_closed_descriptor_is_empty_and_warns() -> None:
    with listening(socket.AF_INET, ("127.0.0.1", 0)) as server:
        report, stderr = run_child([server.fileno()], {"LISTEN_FDS": "2"})  # fd 4 is not open
    assert report["sockets"] == []
    assert report["environ"] == []
    assert "WARNING" in stderr and "fd 4" in stderr


def test_listen_sockets_skips_a_descriptor_that_is_not_a_socket() -> None:
    read, write = os.pipe()
    try:
        with listening(socket.AF_INET, ("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            with queued_client(socket.AF_INET, ("127.0.0.1", port)) as client:
                report, stderr = run_child([read, server.fileno()], {"LISTEN_FDS": "2"})
                assert client.recv(16) == b"ok"
    finally:
        os.close(read)
        os.close(write)
    assert report["sockets"] == [
        {"fd": 4, "family": "AF_INET", "type": "SOCK_STREAM", "name": ["127.0.0.1", port]}
    ]
    assert "WARNING" in stderr and "fd 3" in stderr


ACTIVATED = """
import json, os, socket
from chatd.systemd import listen_sockets
sockets = listen_sockets()
print(json.dumps({
    "sockets": [[s.fileno(), s.family.name, s.getsockname()] for s in sockets],
    "environ": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}), flush=True)
sockets[0].settimeout(10)
conn, _ = sockets[0].accept()
conn.sendall(b"ok")
conn.close()
"""


def connect_when_listening(path: Path, deadline: float) -> socket.socket:
    """A connection to ``path``: the tool creates the file when it binds, and only then
    listens, so a connection made in between is refused (seen on a loaded machine)."""
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(TIMEOUT)
        try:
            client.connect(str(path))
            return client
        except ConnectionRefusedError:
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_listen_sockets_under_systemd_socket_activate(tmp_path: Path) -> None:
    """systemd's own tool: it binds, waits for a connection, then execs the service."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian: apt-get install systemd)")
    path = tmp_path / "chatd.sock"
    with subprocess.Popen(
        [activate, "--listen", str(path), "--fdname=chatd", "--setenv", f"PYTHONPATH={ROOT}",
         sys.executable, "-c", ACTIVATED],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            deadline = time.monotonic() + TIMEOUT
            while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            with connect_when_listening(path, deadline) as client:
                assert client.recv(16) == b"ok"
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out) == {"sockets": [[3, "AF_UNIX", str(path)]], "environ": []}


# The unit files


def unit_copies(tmp_path: Path) -> list[Path]:
    """The units in a scratch directory, ExecStart= pointing at a binary that exists here:
    ``systemd-analyze verify`` insists on it."""
    service = (SCRIPTS / "chatd.service").read_text()
    assert service.count("ExecStart=/usr/local/bin/chatd ") == 1
    executable = shutil.which("chatd") or sys.executable
    assert " " not in executable
    (tmp_path / "chatd.service").write_text(
        service.replace("ExecStart=/usr/local/bin/chatd ", f"ExecStart={executable} ")
    )
    shutil.copy(SCRIPTS / "chatd.socket", tmp_path / "chatd.socket")
    return [tmp_path / "chatd.service", tmp_path / "chatd.socket"]


def verify(units: list[Path]) -> tuple[int, list[str]]:
    """``systemd-analyze verify``'s exit status, and the lines of its output about ``units``.

    It reports most mistakes in a unit (unknown keys, values it cannot parse) as
    warnings, "FILE:LINE: ... ignoring.", and still exits 0; and it may say things
    about the machine it runs on (a container without systemd as PID 1, other units
    on the system), which are not the units' fault.  So both count.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    proc = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True, text=True, timeout=60, cwd=units[0].parent,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "LC_ALL": "C"},
    )
    names = {unit.name for unit in units} | {str(unit.parent) for unit in units}
    about = [
        line for line in (proc.stdout + proc.stderr).splitlines()
        if any(name in line for name in names)
    ]
    return proc.returncode, about


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    status, about = verify(unit_copies(tmp_path))
    assert (status, about) == (0, [])


def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is only a warning, and exit status 0."""
    service, sock = unit_copies(tmp_path)
    service.write_text(service.read_text().replace("Type=notify", "Tpye=notify"))
    sock.write_text(sock.read_text().replace("Accept=no", "Accept=maybe"))
    _, about = verify([service, sock])
    assert any("Tpye" in line for line in about), about
    assert any("chatd.socket:" in line and "maybe" in line for line in about), about


def test_service_unit_says_what_chatd_relies_on() -> None:
    settings = [
        line for line in (SCRIPTS / "chatd.service").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    for wanted in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "TimeoutStopSec=20",
        "DynamicUser=yes",
        "StateDirectory=chatd",
        "MemoryDenyWriteExecute=yes",
        "WantedBy=multi-user.target",
    ):
        assert wanted in settings
    assert "ListenStream=127.0.0.1:7777" in (SCRIPTS / "chatd.socket").read_text().splitlines()


def _service_exec_start() -> list[str]:
    unit = (ROOT / "scripts" / "chatd.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    return shlex.split(exec_start.removeprefix("ExecStart="))


async def test_unit_exec_start_notifies_ready_after_the_port_accepts_then_stopping(
    tmp_path: Path,
) -> None:
    """The service's own ExecStart line, run with a fake NOTIFY_SOCKET as systemd would."""
    argv = _service_exec_start()
    assert Path(argv[0]).name == "chatd"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "chatd", *argv[1:]]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--db") + 1] = str(tmp_path / "chatd.sqlite3")

    notify_path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.setblocking(False)
    env = {**fast_env(), "NOTIFY_SOCKET": notify_path}
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stderr=asyncio.subprocess.DEVNULL)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            ready = (await loop.sock_recv(listener, 4096)).decode()
        assert ready.startswith("READY=1")
        # Ready means ready: the port accepts at once, and the server answers.
        client = await Client.connect("127.0.0.1", port, timeout=5)
        assert (await client.call("/ping"))["code"] == 0
        await client.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            stopping = (await loop.sock_recv(listener, 4096)).decode()
            assert await proc.wait() == 0
        assert stopping == "STOPPING=1"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        listener.close()
