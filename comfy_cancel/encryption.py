"""Runner header values at rest: sealed with Fernet under ``COMFY_CANCEL_SECRET_KEY``.

Header values are credentials for a customer's ComfyUI (``Authorization``, API keys), so
the database holds them only encrypted; their names stay readable, so the API can list
them without the key. The setting holds one or more Fernet keys, comma-separated, newest
first: the first seals, every one unseals (:class:`cryptography.fernet.MultiFernet`), so a
key is rotated by putting the new one in front and running ``comfy-cancel runner
reseal``, then dropping the old one.

Without a key, headers are refused, never stored in clear (:class:`SecretKeyMissing`).
With a key that opens nothing (:class:`SecretKeyWrong`), the error says so in one line.
"""

from __future__ import annotations

import json
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

SECRET_KEY_SETTING = "COMFY_CANCEL_SECRET_KEY"


class SecretKeyError(Exception):
    """The headers cannot be sealed or unsealed; the message says what to do."""


class SecretKeyMissing(SecretKeyError):
    def __init__(self, reading: bool = False) -> None:
        if reading:
            message = (f"runner headers cannot be decrypted: this process has no "
                       f"{SECRET_KEY_SETTING}; set the key they were encrypted with")
        else:
            message = (
                f"runner headers cannot be stored: this deployment has no {SECRET_KEY_SETTING} "
                "to encrypt them with (the operator makes one with `comfy-cancel runner "
                "new-key`); register the runner without headers or ask the operator"
            )
        super().__init__(message)


class SecretKeyWrong(SecretKeyError):
    def __init__(self) -> None:
        super().__init__(
            f"runner headers cannot be decrypted with {SECRET_KEY_SETTING}: it is not the key "
            "they were encrypted with (when rotating, keep the old key after the new one "
            "until `comfy-cancel runner reseal` has run)"
        )


def new_key() -> str:
    return Fernet.generate_key().decode()


@lru_cache(maxsize=4)
def _cipher(keys: str) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.strip()) for key in keys.split(",") if key.strip()])
    except ValueError as exc:
        raise SecretKeyError(
            f"{SECRET_KEY_SETTING} is not a list of Fernet keys (32 url-safe base64-encoded "
            "bytes each; make one with `comfy-cancel runner new-key`)"
        ) from exc


def check_keys(keys: str) -> str:
    """For the settings validator: a malformed key fails at startup."""
    if keys.strip():
        _cipher(keys)
    return keys


def seal(headers: dict[str, str], keys: str) -> str:
    if not keys.strip():
        raise SecretKeyMissing()
    return _cipher(keys).encrypt(json.dumps(headers).encode()).decode()


def unseal(token: str, keys: str) -> dict[str, str]:
    if not keys.strip():
        raise SecretKeyMissing(reading=True)
    try:
        plain = _cipher(keys).decrypt(token.encode())
    except InvalidToken:
        raise SecretKeyWrong() from None
    headers = json.loads(plain)
    return {str(k): str(v) for k, v in headers.items()}


def reseal(token: str, keys: str) -> str:
    """``token`` sealed again under the newest key (rotation)."""
    if not keys.strip():
        raise SecretKeyMissing(reading=True)
    try:
        return _cipher(keys).rotate(token.encode()).decode()
    except InvalidToken:
        raise SecretKeyWrong() from None
