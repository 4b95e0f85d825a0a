"""How URLs and settings are shown: the one masking rule for the CLI, the API and logs.

A URL may carry a credential in its authority (``user:pass@host``, ``token@host``) or in
its query (``?token=...``, ``?password=...``); both are masked wherever a URL is shown.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Query parameters that are ours and never secret (the WebSocket's client id).
_SHOWN_QUERY_KEYS = frozenset({"clientId"})
# Settings whose whole value is a secret.
SECRET_SETTINGS = frozenset({"secret_key"})


def redact_url(url: str) -> str:
    """``url`` as it may be shown: no password (or lone token) in the authority, no query
    values but our own ``clientId``. Something that is not a URL comes back as given."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}" if ":" in userinfo \
            else f"{MASK}@{host}"
    query = "&".join(
        pair if "=" not in pair or pair.split("=", 1)[0] in _SHOWN_QUERY_KEYS
        else f"{pair.split('=', 1)[0]}={MASK}"
        for pair in parts.query.split("&")
        if pair
    )
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # rebuilding could change it (sqlite:////abs/path loses a slash)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_setting(name: str, value: object) -> str:
    """A setting's value as ``comfy-cancel settings`` prints it."""
    if value is None:
        return "(unset)"
    if name in SECRET_SETTINGS:
        return MASK
    text = str(value)
    return redact_url(text) if "://" in text else text
