"""W&B's start-up check (issue 19, fault 10): a malformed key, a rejected key, no server or a server
that never answers are found in a few seconds, before any data is prepared; ``auto`` then logs
offline and says why in one line, ``online`` refuses to start. Local servers stand in for W&B."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from sectional_moe.errors import ConfigError
from sectional_moe.tracking.wandb_ids import api_key_problem, startup_mode
from sectional_moe.tracking import wandb_files

GOOD_KEY = "a" * 40


@contextmanager
def server(status: int) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b'{"data": {"viewer": {"id": "x"}}}')

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers (a firewall that drops replies, a hung proxy)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _closed_port() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("key,problem", [("abc", "3 characters"), ("a" * 39, "39 characters"), (" " + "a" * 40, "whitespace"),
                                         ("a" * 20 + "!" + "a" * 20, "characters other than")])
def test_malformed_keys_are_named(key, problem):
    assert problem in api_key_problem(key)


def test_well_formed_keys_pass():
    assert api_key_problem("a" * 40) is None and api_key_problem("local-" + "b" * 40) is None
    assert api_key_problem("eyJhbGc.eyJzdWIi.c2lnbmF0dXJl") is None  # a JWT


def test_an_accepted_key_goes_online(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", GOOD_KEY)
    with server(200) as url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        assert startup_mode("auto", 5) == ("online", None)


def test_a_rejected_key_goes_offline_and_says_so(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", GOOD_KEY)
    with server(401) as url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        mode, note = startup_mode("auto", 5)
    assert mode == "offline" and "rejected the API key (HTTP 401)" in note and "wandb sync" in note


def test_no_server_goes_offline_at_once(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", GOOD_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", _closed_port())
    started = time.monotonic()
    mode, note = startup_mode("auto", 5)
    assert mode == "offline" and "is unreachable" in note and time.monotonic() - started < 3


def test_a_server_that_never_answers_costs_the_timeout_only(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", GOOD_KEY)
    with silent_server() as url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        started = time.monotonic()
        mode, note = startup_mode("auto", 1.5)
        took = time.monotonic() - started
    assert mode == "offline" and "did not answer within 1.5 s" in note and took < 4


def test_online_refuses_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", GOOD_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", _closed_port())
    with pytest.raises(ConfigError) as err:
        startup_mode("online", 5)
    assert err.value.key == "logger.wandb.mode" and "use logger.wandb.mode=offline" in str(err.value)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("NETRC", "/nonexistent")
    assert startup_mode("auto", 5) == ("offline", None)  # no key: offline, the documented default
    with pytest.raises(ConfigError, match="no W&B API key"):
        startup_mode("online", 5)
    assert startup_mode("disabled", 5) == ("disabled", None)


def test_the_run_file_reader_is_a_fallback_that_says_when_it_cannot_read(tmp_path, monkeypatch):
    """Another wandb's run files: one line naming the way out, and nothing waits for them."""
    path = tmp_path / "run-x.wandb"
    path.write_bytes(wandb_files.FILE_MAGIC + b"\x00" * 3 + b"\x00" * 4 + b"\x05\x00\x01" + b"\xff\xff\xff\xff\xff")
    with pytest.raises(wandb_files.RunFileUnreadable) as err:
        wandb_files.read_run(path)
    assert "csv/metrics.csv holds the same metrics" in str(err.value) and "\n" not in str(err.value)

    def no_proto(path):
        raise wandb_files.RunFileUnreadable("no wandb.proto")

    monkeypatch.setattr(wandb_files, "_record_class", no_proto)
    started = time.monotonic()
    assert wandb_files.wait_until_written(path, timeout_s=30) is True and time.monotonic() - started < 1
