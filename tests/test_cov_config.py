"""Settings refused with a reason, and the log formats: in memory, through the same
load() the command line uses (test_operations.py covers the layering and the common cases)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd import config as settings
from chatd import logs
from chatd.config import ConfigError


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CHATD_ARGON2_PARALLELISM": "4", "CHATD_ARGON2_MEMORY_COST": "16"},
         "argon2_memory_cost must be at least 8 KiB per lane"),
        ({"CHATD_TLS_CERT": "/etc/chatd/cert.pem"}, "tls_cert and tls_key go together"),
        ({"CHATD_TRUSTED_NETWORKS": "10.0.0.0/33"}, "trusted_networks: "),
        ({"CHATD_METRICS_PORT": "65536"}, "metrics_port must be 0..65535, got 65536"),
        ({"CHATD_IRC_PORT": "70000"}, "irc_port must be 0..65535, got 70000"),
        ({"CHATD_IRC_TLS_PORT": "6697"}, "irc_tls_port needs tls_cert and tls_key"),
        ({"CHATD_SERVER_NAME": "my server"}, "server_name must be one word"),
        ({"CHATD_SERVER_NAME": ""}, "server_name must be one word"),
        ({"CHATD_BUS": "http://localhost:6379"}, "bus must be local or a redis:// URL"),
        ({"CHATD_NODE_ID": "node/1"}, "node_id may not hold spaces, '|' or '/'"),
        ({"CHATD_IRC_GUESTS": "maybe"}, "CHATD_IRC_GUESTS: expected true or false, got 'maybe'"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_reason(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        settings.load({}, environ)


@pytest.mark.parametrize(("raw", "value"), [("yes", True), ("ON", True), ("0", False),
                                            ("off", False)])
def test_yes_and_no_spellings_of_a_switch(raw: str, value: bool) -> None:
    assert settings.load({}, {"CHATD_IRC_GUESTS": raw}).irc_guests is value


def test_a_config_file_that_cannot_be_read_is_named_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=f"cannot read config file {missing}: No such file"):
        settings.load({}, {}, str(missing))


# Logs.


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back after the test (pytest's own
    log capture hangs a handler there)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_extra_fields_and_the_exception(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", "json")
    log = logging.getLogger("chatd.test")
    log.info("login %s", "ann", extra={"peer": "127.0.0.1:5000"})
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        log.exception("commit failed")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["message"] == "login ann" and first["peer"] == "127.0.0.1:5000"
    assert first["logger"] == "chatd.test" and first["level"] == "INFO"
    assert "exception" not in first
    assert second["message"] == "commit failed"
    assert second["exception"].startswith("Traceback") and "disk on fire" in second["exception"]


def test_configuring_again_replaces_the_handler_instead_of_doubling_lines(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    root_logger.addHandler(logging.StreamHandler(io.StringIO()))  # one set up before
    logs.configure("info", "json")
    logs.configure("warning", "text")
    log = logging.getLogger("chatd.test")
    log.info("not shown at WARNING")
    log.warning("shown once")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("WARNING chatd.test: shown once")
    assert len(root_logger.handlers) == 1
