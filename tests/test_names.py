"""Look-alike and invisible names (issue 11, F6): Unicode's identifier rules for new
names, in memory and over real sockets, and the migration of an existing database."""

from __future__ import annotations

import asyncio
import ctypes.util
import importlib.util
import sqlite3
from pathlib import Path
from typing import Any

import argon2
import pytest

from chatd import names, store, validation
from chatd.errors import BadRequest, ChatdError, NameTaken
from chatd.protocol import Params
from tests.conftest import PASSWORD, ROOT, Harness, MakeHarness

# Every name the issue found registered beside `alice`: each must be refused (code 1)
# or taken (code 4).
LOOKALIKES_OF_ALICE = {
    "cyrillic a": "\u0430lice",
    "greek capital alpha": "\u0391lice",
    "latin alpha": "\u0251lice",
    "dotless i": "al\u0131ce",
    "capital i with dot": "AL\u0130CE",
    "combining grapheme joiner": "alice\u034f",
    "variation selector 16": "alice\ufe0f",
    "variation selector 1": "alice\ufe00",
    "variation selector 17": "alice\U000e0100",
    "mongolian variation selector": "alice\u180b",
    "hangul filler": "alice\u3164",
    "capital i for small l": "AIice",
    "fullwidth": "\uff41\uff4c\uff49\uff43\uff45",
    "mathematical bold": "\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e",
}
INVISIBLE_ALONE = ["\u3164", "\u115f", "\uffa0", "\u200b", "\u034f", "\ufe0f"]
# Names that must keep working, each a different name from the others.
LEGITIMATE = ["Zoë", "José", "алиса", "दिल्ली", "東京たろう", "bob_2", "a.b-c", "Kim한국", "abcあ"]


def registration(name: str) -> dict[str, str]:
    return {"name": name, "password": PASSWORD, "password_repete": PASSWORD}


def _params(name: str) -> Params:
    return Params({"name": name})


def expected_code(name: str) -> int:
    """1 if the name breaks a rule for new names, else 4 (it must then look like alice)."""
    try:
        validation.new_user_name(_params(name))
    except BadRequest:
        return 1
    return 4


def refused_or_taken_beside(existing: str, name: str) -> bool:
    """In memory, what /register decides for ``name`` once ``existing`` is registered."""
    try:
        validation.new_user_name(_params(name))
    except BadRequest:
        return True
    mine, theirs = validation.name_skeletons(name), validation.name_skeletons(existing)
    same_key = validation.name_key(name) == validation.name_key(existing)
    return same_key or mine[0] == theirs[0] or mine[1] == theirs[1]


# In memory: the rules themselves.


@pytest.mark.parametrize("name", LOOKALIKES_OF_ALICE.values(), ids=LOOKALIKES_OF_ALICE.keys())
def test_every_lookalike_of_alice_is_refused_or_taken(name: str) -> None:
    assert refused_or_taken_beside("alice", name)


@pytest.mark.parametrize("name", LEGITIMATE)
def test_legitimate_names_are_accepted_and_distinct(name: str) -> None:
    assert validation.new_user_name(_params(name)) == name
    for other in LEGITIMATE:
        if other != name:
            assert not refused_or_taken_beside(other, name), other


@pytest.mark.parametrize("name", INVISIBLE_ALONE)
def test_invisible_characters_are_refused_alone_and_inside_a_name(name: str) -> None:
    for candidate in (name, f"a{name}b", f"bob{name}"):
        with pytest.raises(BadRequest):
            validation.new_user_name(_params(candidate))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("\u0430lice", "script"),  # Cyrillic with Latin
        ("\u03a9mega", "script"),  # Greek with Latin
        ("bob\u0431", "script"),
        ("\u0301abc", "combining mark"),  # nothing to combine with
        ("e\u0301\u0301", "repeat"),  # drawn once, over itself
        ("a1\u0661", "digits"),  # ASCII and Arabic-Indic digits
    ],
)
def test_new_names_follow_the_identifier_rules(name: str, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        validation.new_user_name(_params(name))


def test_scripts_mix_only_as_uts39_highly_restrictive_allows() -> None:
    assert names.is_highly_restrictive("алиса_2.0")  # Common goes with any script
    assert names.is_highly_restrictive("東京タワーとたろう")  # Han + Katakana + Hiragana: Jpan
    assert names.is_highly_restrictive("Seoul서울")  # Latin + Hangul: Kore
    assert names.is_highly_restrictive("東京서울")  # Han + Hangul: Kore
    assert not names.is_highly_restrictive("たろう서울")  # Japanese kana with Korean
    assert not names.is_highly_restrictive("Deliदिल्ली")  # Latin + Devanagari
    assert not names.is_highly_restrictive("\U000e0041")  # no known script: refused


def test_default_ignorable_table_holds_unicode_ranges() -> None:
    # DerivedCoreProperties.txt, Unicode 15.0: Default_Ignorable_Code_Point.
    for code_point in (0x00AD, 0x034F, 0x115F, 0x180B, 0x200B, 0x2065, 0x3164, 0xFE00,
                       0xFEFF, 0xFFA0, 0x1D173, 0xE0001, 0xE0100, 0xE0FFF):
        assert names.is_default_ignorable(chr(code_point)), hex(code_point)
    for ch in "a_-.0\u00a0\u0300\u0e33":
        assert not names.is_default_ignorable(ch), hex(ord(ch))
    assert names.UNICODE_VERSION == "15.0.0"


def test_skeletons_fold_what_looks_alike_and_keep_what_differs() -> None:
    def same(a: str, b: str) -> bool:
        return refused_or_taken_beside(a, b) and refused_or_taken_beside(b, a)

    assert same("bob", "b0b")
    assert same("mary", "rnary")
    assert same("liam", "Iiam")
    assert same("José", "Jose")  # accents on Latin letters are not a difference
    assert same("HOME", "\u0397\u039f\u039c\u0395")  # in capitals, Greek looks Latin
    assert not same("कुल", "कल")  # Devanagari vowel signs spell the word
    assert not same("かき", "がき")  # so does the Japanese voicing mark
    assert not same("alice", "alicia")


def test_lookups_keep_the_old_rule_so_existing_names_stay_reachable() -> None:
    # Only new names are held to the new rules: /send to an account created before
    # them must still find it.
    assert validation.user_name(_params("\u0430lice")) == "\u0430lice"
    assert validation.user_name(_params("alice\u034f")) == "alice\u034f"


def test_skeletons_are_unchanged_by_the_case_and_width_of_the_name() -> None:
    for name in ("alice", "ALICE", "\uff41\uff4c\uff49\uff43\uff45", "Straße", "STRASSE"):
        assert validation.name_skeletons(name) == validation.name_skeletons(name.lower())


def test_the_tables_are_those_protocol_md_cites() -> None:
    text = (ROOT / "protocol.md").read_text()
    assert f"Unicode {names.UNICODE_VERSION}" in text


# Over real sockets.


async def test_lookalikes_of_a_user_are_refused_by_register(harness: Harness) -> None:
    client = await harness.connect()
    await client.request("/register", registration("alice"))
    codes = {}
    for label, name in LOOKALIKES_OF_ALICE.items():
        codes[label] = (await client.call("/register", registration(name)))["code"]
    assert codes == {label: expected_code(name) for label, name in LOOKALIKES_OF_ALICE.items()}
    assert codes["latin alpha"] == codes["dotless i"] == codes["capital i with dot"] == 4
    assert codes["cyrillic a"] == codes["hangul filler"] == 1


async def test_a_taken_lookalike_gets_the_same_answer_as_a_taken_name(harness: Harness) -> None:
    client = await harness.connect()
    await client.request("/register", registration("alice"))
    replies = []
    for name in ("alice", "al\u0131ce"):
        reply = await client.call("/register", registration(name))
        replies.append((reply["code"], reply["msg"]))
    assert replies[0] == replies[1] == (4, "name already taken")


async def test_legitimate_names_register_and_log_in(harness: Harness) -> None:
    client = await harness.connect()
    for name in LEGITIMATE:
        await client.request("/register", registration(name))
        reply = await client.request("/login", {"name": name, "password": PASSWORD})
        assert reply["name"] == name


async def test_channels_follow_the_same_rules(harness: Harness) -> None:
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    assert (await alice.request("/channel/join", {"name": "general"})) == {"name": "general"}
    for name in ("generaI", "gener\u0430l", "g\u0435neral", "general\u200d", "general\ufe0f"):
        for op, params in (
            ("/channel/join", {"name": name}),
            ("/channel/send", {"name": name, "message": "hi"}),
            ("/channel/receive", {"name": name}),
        ):
            with pytest.raises((BadRequest, NameTaken)) as refused:
                await bob.request(op, params)
            assert refused.value.code in (1, 4), (op, name)
    with pytest.raises(NameTaken, match="general"):  # names the channel meant, to join it
        await bob.request("/channel/join", {"name": "GENERAI"})
    assert (await bob.request("/channel/join", {"name": "GENERAL"})) == {"name": "general"}
    assert (await bob.request("/channel/list"))["channels"] == [{"name": "general", "unread": 0}]
    for name in ("алиса", "東京", "dev_2"):
        assert (await bob.request("/channel/join", {"name": name})) == {"name": name}


# The migration of a database made before skeletons existed.


def _version_2_database(path: Path) -> None:
    """A database as the code before this change made it: schema version 2."""
    password_hash = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(
        PASSWORD
    )
    db = sqlite3.connect(path)
    for script in store.MIGRATIONS[:2]:
        assert isinstance(script, str)
        db.executescript(script)
    db.execute("PRAGMA user_version=2")
    users = ["alice", "\u0430lice", "bob"]  # two look-alikes, as the old rules let in
    for name in users:
        db.execute(
            "INSERT INTO users (name, name_key, password_hash, created_at) VALUES (?, ?, ?, 0)",
            (name, validation.name_key(name), password_hash),
        )
    for name in ("general", "g\u0435neral"):
        db.execute(
            "INSERT INTO channels (name, name_key, created_at) VALUES (?, ?, 0)",
            (name, validation.name_key(name)),
        )
    db.commit()
    db.close()


async def test_an_existing_database_is_migrated_and_its_lookalikes_keep_working(
    tmp_path: Path, make_harness: MakeHarness
) -> None:
    path = tmp_path / "old.sqlite3"
    _version_2_database(path)

    harness = await make_harness(db=str(path))

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(store.MIGRATIONS)
        rows = db.execute("SELECT name, skeleton, upper_skeleton FROM users").fetchall()
        assert {name: (s, u) for name, s, u in rows} == {
            name: validation.name_skeletons(name) for name in ("alice", "\u0430lice", "bob")
        }
        assert db.execute("SELECT COUNT(*) FROM channels WHERE skeleton IS NULL").fetchone() == (0,)
    impostor = await harness.connect()
    await impostor.login("\u0430lice", PASSWORD)  # both old accounts still log in
    alice = await harness.connect()
    await alice.login("alice", PASSWORD)
    await alice.request("/send", {"name": "\u0430lice", "msg": "still reachable"})
    assert (await impostor.request("/receive"))["messages"] == {"alice": ["still reachable"]}
    joined = await alice.request("/channel/join", {"name": "g\u0435neral"})
    assert joined == {"name": "g\u0435neral"}
    for name in ("AL\u0130CE", "b0b"):  # new look-alikes of old names are taken
        with pytest.raises(NameTaken):
            await alice.request("/register", registration(name))
    with pytest.raises(NameTaken):
        await alice.request("/channel/join", {"name": "GENERAI"})


async def test_two_lookalike_registrations_at_once_make_one_account(harness: Harness) -> None:
    clients = [await harness.connect() for _ in range(2)]
    replies = await asyncio.gather(
        clients[0].call("/register", registration("alice")),
        clients[1].call("/register", registration("al\u0131ce")),
    )
    assert sorted(reply["code"] for reply in replies) == [0, 4]


def test_check_new_name_names_what_it_checks() -> None:
    with pytest.raises(ChatdError, match="channel name"):
        validation.check_new_name("a\u200bb", "channel name")


# The vendored tables against their source, where the machine has ICU (Debian: libicu72).


def _generator() -> Any:
    path = ROOT / "scripts" / "unicode_tables.py"
    spec = importlib.util.spec_from_file_location("unicode_tables", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_icu = pytest.mark.skipif(
    ctypes.util.find_library("icuuc") is None, reason="no system ICU to regenerate from"
)


@needs_icu
def test_uts39_txt_is_what_the_generator_makes(capsys: pytest.CaptureFixture[str]) -> None:
    generator = _generator()
    if generator.Icu().unicode_version != names.UNICODE_VERSION:
        pytest.skip("the system ICU has another Unicode version than chatd/uts39.txt")
    generator.main()
    assert capsys.readouterr().out == (ROOT / "chatd" / "uts39.txt").read_text("utf-8")


@needs_icu
def test_prototypes_of_whole_strings_match_icus_skeleton() -> None:
    icu = _generator().Icu()
    if icu.unicode_version != names.UNICODE_VERSION:
        pytest.skip("the system ICU has another Unicode version than chatd/uts39.txt")
    for text in ("p\u0430ypal", "ALİCE", "ﬁle", "m\u0307", "Zoë", "अद्भुत", "ǅemal", "\ua7b50\u2113"):
        assert names._prototypes(text) == icu.skeleton(text), text
