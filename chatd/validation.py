"""Rules for names, passwords and message text (protocol.md, "Names and limits").

A value longer than its maximum is TooLarge (code 7); any other violation
(empty, too short, bad characters) is BadRequest (code 1).
"""

from __future__ import annotations

import functools
import unicodedata

from chatd.errors import BadRequest
from chatd.protocol import Params

MAX_NAME_LENGTH = 32
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
MAX_CLIENT_ID_LENGTH = 64
_NAME_PUNCTUATION = frozenset("_-.")


@functools.lru_cache(maxsize=16384)
def name_key(name: str) -> str:
    """The case-insensitive identity of a name: NFKC, casefold, NFKC (Unicode's NFKC_Casefold)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def _name_character(ch: str) -> bool:
    # Letters, marks (so scripts such as Devanagari spell whole words) and digits.
    return unicodedata.category(ch)[0] in "LMN" or ch in _NAME_PUNCTUATION


def _check_name(value: str, what: str) -> str:
    if not value:
        raise BadRequest(f"{what} must not be empty")
    if not _is_valid_name(value):
        raise BadRequest(f"{what} may contain only letters, digits, '_', '-' and '.'")
    return value


@functools.lru_cache(maxsize=16384)
def _is_valid_name(value: str) -> bool:
    # Cached: the same few names are checked on every send.
    return all(_name_character(ch) for ch in unicodedata.normalize("NFKC", value))


def user_name(params: Params, key: str = "name") -> str:
    return _check_name(params.text(key, MAX_NAME_LENGTH), "name")


def channel_name(params: Params, key: str = "name") -> str:
    return _check_name(params.text(key, MAX_NAME_LENGTH), "channel name")


def new_password(params: Params, key: str) -> str:
    password = params.text(key, MAX_PASSWORD_LENGTH)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise BadRequest(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    return password


def message_text(params: Params, key: str, max_length: int) -> str:
    text = params.text(key, max_length)
    if not text:
        raise BadRequest("message must not be empty")
    return text
