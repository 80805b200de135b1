"""Rules for names, passwords and message text (protocol.md, "Names and limits").

A value longer than its maximum is TooLarge (code 7); any other violation
(empty, too short, bad characters) is BadRequest (code 1).  A new name (a
registration, a channel's creation) must also pass Unicode's identifier rules
(chatd/names.py); names already in the database keep working under the old rule.
"""

from __future__ import annotations

import functools
import unicodedata

from chatd import names
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


def new_user_name(params: Params, key: str = "name") -> str:
    """A name for a new account: the name rule, and Unicode's rules for new names."""
    name = user_name(params, key)
    check_new_name(name, "name")
    return name


def check_new_name(name: str, what: str) -> None:
    """Raise BadRequest unless ``name`` (valid as a name) may be given to something new."""
    problem = _new_name_problem(name)
    if problem is not None:
        raise BadRequest(f"{what} {problem}")


@functools.lru_cache(maxsize=1024)
def _new_name_problem(name: str) -> str | None:
    normalized = unicodedata.normalize("NFKC", name)
    # Both forms: NFKC maps some invisible characters to others (U+3164 to U+1160).
    problem = names.invisible_problem(name) or names.invisible_problem(normalized)
    if problem is not None:
        return problem
    if not names.is_highly_restrictive(normalized):
        return (
            "must be written in one script (digits and '_-.' go with any; Latin also"
            f" with Chinese, Japanese or Korean; Unicode {names.UNICODE_VERSION})"
        )
    if names.mixes_number_systems(normalized):
        return "must not mix digits of different number systems"
    return None


def name_skeletons(name: str) -> tuple[str, str]:
    """What the name looks like, in small letters and in capitals (chatd/names.py):
    a new name must share neither with an existing one."""
    return names.skeletons_of_key(name_key(name))


def new_password(params: Params, key: str, minimum: int = MIN_PASSWORD_LENGTH) -> str:
    """``minimum`` is the operator's min_password_length."""
    password = params.text(key, MAX_PASSWORD_LENGTH)
    if len(password) < minimum:
        raise BadRequest(f"password must be at least {minimum} characters")
    return password


def message_text(params: Params, key: str, max_length: int) -> str:
    text = params.text(key, max_length)
    if not text:
        raise BadRequest("message must not be empty")
    return text
