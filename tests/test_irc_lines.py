"""IRC lines without a server: the ircdocs parser vectors, limits, and fuzzing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parser_tests import data as vectors  # irc-parser-tests (CC0)

from chatd.irc.lines import (
    MAX_BUFFERED,
    MAX_LINE,
    NOT_UTF8,
    TAGS_TOO_LONG,
    TOO_LONG,
    LineDecoder,
    LineError,
    Message,
    format_line,
    parse,
    split_text,
    utf8_len,
)

SPLIT: list[dict[str, Any]] = vectors.msg_split["tests"]
JOIN: list[dict[str, Any]] = vectors.msg_join["tests"]


@pytest.mark.parametrize("case", SPLIT, ids=[c["input"][:40] for c in SPLIT])
def test_parser_vectors_split(case: dict[str, Any]) -> None:
    message = parse(case["input"].encode())
    assert message is not None
    atoms = case["atoms"]
    assert message.command == atoms["verb"].upper()
    assert message.params == atoms.get("params", [])
    assert message.tags == (atoms.get("tags") or {})
    assert message.source == atoms.get("source")


@pytest.mark.parametrize("case", JOIN, ids=[str(i) for i in range(len(JOIN))])
def test_parser_vectors_join(case: dict[str, Any]) -> None:
    atoms = case["atoms"]
    params, source, tags = atoms.get("params", []), atoms.get("source"), atoms.get("tags")
    line = format_line(atoms["verb"], params, source, tags)
    assert line.endswith(b"\r\n")
    assert line[:-2].decode() in case["matches"]


def test_blank_and_commandless_lines() -> None:
    assert parse(b"") is None
    assert parse(b"   \r") is None
    for raw in (b":source", b"@a=b", b"@a=b ", b":source   "):
        with pytest.raises(LineError):
            parse(raw)


def test_line_limit_is_512_bytes_without_tags() -> None:
    fits = b"PRIVMSG a :" + b"x" * (MAX_LINE - 2 - len(b"PRIVMSG a :"))
    assert parse(fits) is not None
    assert parse(b"@" + b"t" * 4094 + b" " + fits) is not None  # tags do not count
    with pytest.raises(LineError) as raised:
        parse(fits + b"x")
    assert (raised.value.kind, raised.value.command) == (TOO_LONG, "PRIVMSG")
    with pytest.raises(LineError) as raised:
        parse(b"@" + b"t" * 4095 + b" " + fits)
    assert raised.value.kind == TAGS_TOO_LONG


def test_not_utf8_names_the_command() -> None:
    with pytest.raises(LineError) as raised:
        parse(b"privmsg #a :\xc3\x28")
    assert (raised.value.kind, raised.value.command) == (NOT_UTF8, "PRIVMSG")


def test_decoder_splits_lf_and_crlf_across_chunks() -> None:
    decoder = LineDecoder()
    assert decoder.feed(b"PING a\r\nPI") == [Message("PING", ["a"])]
    assert decoder.feed(b"NG b\n\r\nPING c") == [Message("PING", ["b"])]
    assert decoder.feed(b"\r\n") == [Message("PING", ["c"])]


def test_decoder_drops_an_endless_line_once_and_resyncs() -> None:
    decoder = LineDecoder()
    out = decoder.feed(b"PRIVMSG a :" + b"x" * MAX_BUFFERED)
    assert len(out) == 1 and isinstance(out[0], LineError) and out[0].kind == TOO_LONG
    assert decoder.feed(b"x" * MAX_BUFFERED) == []  # still the same line: reported once
    assert decoder.feed(b"xx\r\nPING b\r\n") == [Message("PING", ["b"])]


def test_split_text_never_cuts() -> None:
    text = "é" * 300 + " " + "word " * 100
    pieces = split_text(text, 100)
    assert all(utf8_len(piece) <= 100 for piece in pieces)
    assert "".join(pieces) == text
    assert split_text("a\r\nb\n\nc", 100) == ["a", "b", "c"]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzzed_input_only_raises_line_error(raw: bytes) -> None:
    decoder = LineDecoder()
    for item in decoder.feed(raw) + decoder.feed(b"\r\n"):
        assert isinstance(item, Message | LineError)
        if isinstance(item, Message):
            assert item.command


def _characters(also_not: str) -> st.SearchStrategy[str]:
    # No surrogates: chatd's strings come from strict UTF-8 (msgpack, IRC lines).
    return st.characters(blacklist_characters="\r\n\x00" + also_not, blacklist_categories=["Cs"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet=_characters(" :"), min_size=1), max_size=5),
    st.text(alphabet=_characters("")),
)
def test_format_then_parse_round_trips(middle: list[str], last: str) -> None:
    line = format_line("PRIVMSG", [*middle, last])
    if len(line) > MAX_LINE:  # multi-byte text can pass the limit: refused, never cut
        with pytest.raises(LineError, match=TOO_LONG):
            parse(line.rstrip(b"\r\n"))
        return
    message = parse(line.rstrip(b"\r\n"))
    if not last and not middle:
        assert message is not None and message.params in ([], [""])
        return
    assert message is not None
    assert message.params == [*middle, last]
