"""API tokens: ``cfc_`` plus 32 random bytes, shown once, stored as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "cfc_"


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # The token carries 256 bits of randomness, so a fast hash is enough: there is
    # nothing to brute-force, and lookups by hash stay a single index probe.
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    """The part of a token that may appear in listings and logs."""
    return token[: len(TOKEN_PREFIX) + 6]
