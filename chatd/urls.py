"""Service URLs (PostgreSQL, Redis) as they may be shown: in logs and error messages."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

HIDDEN = "***"


def redact(url: str) -> str:
    """The URL without its secrets: the password of its user part, and the value of any
    query parameter whose name says password (a rediss:// URL's ssl_password)."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        netloc = f"{parts.username or ''}:{HIDDEN}@{netloc.rsplit('@', 1)[1]}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any("password" in name.lower() for name, _ in pairs):
        hidden = [(n, HIDDEN if "password" in n.lower() else v) for n, v in pairs]
        query = urlencode(hidden, safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # Written out, not urlunsplit: it drops the "//" of an empty host (unix:///path).
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
