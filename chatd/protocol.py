"""Requests, responses and events as plain data (protocol.md, "Requests and replies").

Sans-I/O like ``codec.py``: this module turns decoded frame bodies into
:class:`Request` objects and builds the maps the server sends back.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chatd.errors import BadRequest, ChatdError, RateLimited, TooLarge

Data = dict[str, Any]
DATETIME_FORMAT = "%Y.%m.%d:%H:%M:%S"  # the seed's "2020.03.05:12:12:00", always UTC


def format_datetime(timestamp: float) -> str:
    return _format_second(int(timestamp))


@functools.lru_cache(maxsize=1024)
def _format_second(second: int) -> str:
    # Cached: under load thousands of replies a second share the same few seconds.
    return time.strftime(DATETIME_FORMAT, time.gmtime(second))


# What a decoded value was on the wire, for error messages in the client's terms.
_WIRE_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    bytes: "bin (bytes)",
    list: "an array",
    dict: "a map",
    type(None): "nil",
}


def wire_type(value: object) -> str:
    """The msgpack type ``value`` came as, with its article: "an array", "nil"..."""
    return _WIRE_TYPES.get(type(value), "an ext type")  # ExtType, Timestamp


def is_int(value: object) -> bool:
    # bool is a subclass of int in Python, but msgpack's true/false are not ids.
    return isinstance(value, int) and not isinstance(value, bool)


class Params:
    """Typed access to a request's ``params`` map; wrong input raises BadRequest/TooLarge."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = values

    def raw(self, name: str) -> Any:
        """The value as decoded, unchecked (a cache key; never a value to trust)."""
        return self._values.get(name)

    def text(self, name: str, max_length: int) -> str:
        value = self.optional_text(name, max_length)
        if value is None:
            raise BadRequest(f"missing parameter '{name}'")
        return value

    def optional_text(self, name: str, max_length: int) -> str | None:
        value = self._values.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadRequest(f"parameter '{name}' must be a string, not {wire_type(value)}")
        if len(value) > max_length:
            raise TooLarge(f"parameter '{name}' is longer than {max_length} characters")
        return value

    def optional_int(self, name: str, minimum: int | None = None) -> int | None:
        value = self._values.get(name)
        if value is None:
            return None
        if not is_int(value):
            raise BadRequest(f"parameter '{name}' must be an integer, not {wire_type(value)}")
        if not -(2**63) <= value < 2**63:
            raise BadRequest(f"parameter '{name}' must be a 64-bit integer, below 2^63")
        if minimum is not None and value < minimum:
            raise BadRequest(f"parameter '{name}' must be at least {minimum}")
        return int(value)


@dataclass(slots=True)
class Request:
    op: str
    id: int | None
    params: Params
    token: str | None


def request_id(body: object) -> int | None:
    """The id to echo in the reply: the request's ``id`` if it is an integer."""
    if isinstance(body, dict):
        rid = body.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            return rid
    return None


def parse_request(body: object) -> Request:
    """Validate the envelope of a request; unknown keys are ignored."""
    if not isinstance(body, dict):
        raise BadRequest(f"frame body must be a map, not {wire_type(body)}")
    op = body.get("op")
    if op is None:
        raise BadRequest("missing 'op': the operation, such as \"/ping\"")
    if not isinstance(op, str):
        raise BadRequest(f"'op' must be a string, not {wire_type(op)}")
    rid = body.get("id")
    if rid is not None and not is_int(rid):
        raise BadRequest(f"'id' must be an integer, not {wire_type(rid)}")
    params = body.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(f"'params' must be a map, not {wire_type(params)}")
    token = body.get("token")
    if token is not None and not isinstance(token, str):
        raise BadRequest(f"'token' must be a string, not {wire_type(token)}")
    return Request(op=op, id=rid, params=Params(params), token=token)


def success(rid: int | None, data: Data | None = None) -> Data:
    reply: Data = {} if rid is None else {"id": rid}
    reply["code"] = 0
    reply["msg"] = "success"
    if data is not None:
        reply["data"] = data
    return reply


def failure(rid: int | None, error: ChatdError) -> Data:
    reply: Data = {} if rid is None else {"id": rid}
    reply["code"] = int(error.code)
    reply["msg"] = error.message
    if isinstance(error, RateLimited):
        # Rounded up: a client that waits exactly this long is never refused again for it.
        reply["retry_after"] = math.ceil(max(error.retry_after, 0.0) * 1000) / 1000  # seconds
    return reply


def event(name: str, data: Data) -> Data:
    """A server-initiated frame: it carries ``event`` and never ``id``."""
    return {"event": name, "data": data}
