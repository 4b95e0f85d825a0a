"""A real uvicorn server and a raw socket: a client that promises more body than it sends
gets 408 and the connection closed; one without a token gets 401 before it sends any."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from comfy_cancel import manager
from comfy_cancel.config import Settings
from comfy_cancel.db import Database
from testbed.database import migrate
from testbed.stack import api_server
from tests.apitest import UNREACHABLE


def _exchange(url: str, request: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send ``request`` raw; everything the server answers until it closes, and when."""
    parts = urlsplit(url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=wait) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def test_a_content_length_larger_than_the_body_is_408_not_a_held_connection(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    settings = Settings(database_url=url, redis_url=UNREACHABLE, body_read_timeout_seconds=1)
    with api_server(settings) as api_url:
        no_token, _ = _exchange(api_url, b"POST /v1/runner HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Type: application/json\r\n"
                                b"Content-Length: 62914560\r\n\r\n")
        assert no_token.startswith(b"HTTP/1.1 401 "), no_token[:200]

        with Database.from_url(url).transaction() as session:
            account = manager.get_or_create_account(session, "acme")
            token = manager.create_token(session, account)
        promised = (b"POST /v1/runner HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Authorization: Bearer " + token.encode() + b"\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"name\": ")
        answer, seconds = _exchange(api_url, promised)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"COMFY_CANCEL_BODY_READ_TIMEOUT_SECONDS" in answer
        assert 0.9 < seconds < 5  # answered at the timeout, and the connection closed
