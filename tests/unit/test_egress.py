"""The egress guard: which addresses a runner may reach, checked against a real server."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from comfy_cancel.comfyui import ComfyUIClient, ComfyUIError, EventStream
from comfy_cancel.config import Settings
from comfy_cancel.egress import EgressDenied, EgressPolicy, non_public_kind, parse_networks
from comfy_cancel.redact import redact_setting, redact_url

NOBODY = EgressPolicy()
LOOPBACK = EgressPolicy(parse_networks("127.0.0.0/8"))


class Listener:
    """A TCP server on 127.0.0.1 that counts the connections it accepts and answers each
    like Redis does to an HTTP request (an open port that is not ComfyUI)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(1)
                try:
                    conn.recv(4096)
                    conn.sendall(b"-ERR unknown command 'GET'\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def _loopback_names() -> list[str]:
    """Names that resolve to loopback on this machine: ``localhost`` always, and the host
    name when it resolves there too (through DNS or /etc/hosts, not a fixed rule)."""
    names = ["localhost"]
    try:
        infos = socket.getaddrinfo(socket.gethostname(), 80, type=socket.SOCK_STREAM)
    except OSError:
        return names
    if infos and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos):
        names.append(socket.gethostname())
    return names


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "0x7f.0.0.1", *_loopback_names()])
def test_a_blocked_address_is_never_connected_to(listener: Listener, host: str) -> None:
    url = f"http://{host}:{listener.port}"
    with ComfyUIClient(url, timeout=2, egress=NOBODY) as client:
        with pytest.raises(ComfyUIError) as blocked:
            client.system_stats()
        with pytest.raises(ComfyUIError):
            client.watch("c1", reconnect_timeout=0.5)
    assert listener.accepted == 0
    assert "egress" not in str(blocked.value) and "loopback" not in str(blocked.value)


def test_blocked_refused_and_wrong_service_read_the_same(listener: Listener) -> None:
    """No port oracle: blocked, closed and open-but-not-ComfyUI give one message."""
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()

    def message(port: int, policy: EgressPolicy) -> str:
        with (ComfyUIClient(f"http://127.0.0.1:{port}", timeout=2, egress=policy) as client,
              pytest.raises(ComfyUIError) as failed):
            client.queue()
        return str(failed.value).replace(str(port), "PORT")

    blocked = message(listener.port, NOBODY)
    assert listener.accepted == 0
    refused = message(closed_port, LOOPBACK)
    wrong_service = message(listener.port, LOOPBACK)
    assert listener.accepted >= 1  # allowed, so this one did connect
    assert blocked == refused == wrong_service
    assert "unreachable" in blocked


def test_the_websocket_reads_the_same_when_blocked_or_refused(listener: Listener) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    messages = []
    for port, policy in ((listener.port, NOBODY), (closed_port, LOOPBACK)):
        with pytest.raises(ComfyUIError) as failed:
            EventStream(f"ws://127.0.0.1:{port}/ws?clientId=c1", open_timeout=1, egress=policy)
        messages.append(str(failed.value).replace(str(port), "PORT"))
    assert messages[0] == messages[1]
    assert listener.accepted == 0


def test_connect_checks_every_address_of_a_name(listener: Listener) -> None:
    with pytest.raises(EgressDenied):
        NOBODY.connect("localhost", listener.port, 1)
    sock = LOOPBACK.connect("localhost", listener.port, 1)
    sock.close()
    # The listener accepts on its own thread, a moment after the handshake completed.
    deadline = time.monotonic() + 5
    while listener.accepted < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listener.accepted == 1


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"),
        ("::", "unspecified"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
        ("192.168.1.1", "private"), ("fc00::1", "private"), ("fd00:ec2::254", "private"),
        ("100.64.0.1", "shared (carrier-grade NAT)"), ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"), ("64:ff9b::a00:1", "private"),
        ("2002:c0a8:101::1", "private"), ("198.18.0.1", "private"),
        ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("172.32.0.1", None),
    ],
)
def test_non_public_kinds(address: str, kind: str | None) -> None:
    assert non_public_kind(ipaddress.ip_address(address)) == kind


def test_the_allow_list_opens_only_its_networks() -> None:
    policy = EgressPolicy.of(Settings(runner_allowed_networks="10.20.0.0/16, fd00:1::/64"))
    policy.check_url("http://10.20.3.4:8188")
    policy.check_url("http://[fd00:1::5]:8188")
    policy.check_url("http://[::ffff:10.20.3.4]:8188")  # the same host, IPv4-mapped
    for url in ("http://10.21.0.1", "http://127.0.0.1", "http://169.254.169.254"):
        with pytest.raises(EgressDenied):
            policy.check_url(url)


@pytest.mark.parametrize("url", ["ftp://h/x", "file:///etc/passwd", "gopher://h", "http://"])
def test_only_http_and_https(url: str) -> None:
    with pytest.raises(EgressDenied):
        NOBODY.check_url(url)


def test_a_bad_network_setting_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="not a network in CIDR notation"):
        Settings(runner_allowed_networks="10.0.0.0/8, intranet")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://app:pw@db/x", "postgresql+psycopg://app:***@db/x"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://h:6379/0?password=pw", "redis://h:6379/0?password=***"),
        ("http://tok3n@h/x?token=t&clientId=c1", "http://***@h/x?token=***&clientId=c1"),
        ("sqlite:////abs/path.db", "sqlite:////abs/path.db"),
        ("not a url", "not a url"),
    ],
)
def test_one_masking_rule(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_settings_values_masked() -> None:
    assert redact_setting("secret_key", "k") == "***"
    assert redact_setting("result_backend", None) == "(unset)"
    assert redact_setting("redis_url", "redis://u:p@h/0") == "redis://u:***@h/0"
    assert redact_setting("api_port", 8000) == "8000"
