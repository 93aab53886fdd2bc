"""Fixtures: the real acgi-bridge binary, started on a temporary config whose services run the
Python SDK's worker (tests/service.py), on a temporary Unix socket and an OS-chosen TCP port.

The bridge is found through ACGI_BRIDGE_BIN, else <repo>/target/release/acgi-bridge, else
target/debug. Readiness is the bridge's own signal: it prints one ``acgi-bridge ready ...``
line on stdout (with the bound addresses) once it listens; the fixture reads that line.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional

import pytest

SDK = Path(__file__).resolve().parents[1]
REPO = SDK.parents[1]
SERVICE_PY = Path(__file__).resolve().parent / "service.py"
VECTORS = REPO / "sdk" / "vectors" / "frames.txt"
#: How long the bridge may take to print its ready line, and to exit after SIGTERM.
READY_TIMEOUT_SECONDS = 30
EXIT_TIMEOUT_SECONDS = 30
#: The test services' slot: small, so that the copy path is cheap to reach.
SLOT_SIZE_BYTES = 4096


def bridge_binary() -> Path:
    configured = os.environ.get("ACGI_BRIDGE_BIN")
    if configured:
        return Path(configured)
    for profile in ("release", "debug"):
        candidate = REPO / "target" / profile / "acgi-bridge"
        if candidate.exists():
            return candidate
    pytest.skip("no acgi-bridge binary: build it (cargo build --release) or set ACGI_BRIDGE_BIN")


def toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def python_service(service_id: int, name: str, *, min_workers: int = 1, max_workers: int = 4,
                   extra: str = "", queued: bool = True,
                   slot_size_bytes: int = SLOT_SIZE_BYTES) -> str:
    """A ``[[service]]`` whose workers are tests/service.py on the SDK in this tree."""
    args = [str(SERVICE_PY)] + ([] if queued else ["--no-queued"])
    return (
        f"[[service]]\nid = {service_id}\nname = {toml_string(name)}\n"
        f"exec = {toml_string(sys.executable)}\n"
        f"args = [{', '.join(toml_string(a) for a in args)}]\n"
        f"env = {{ PYTHONPATH = {toml_string(str(SDK))} }}\n"
        f"min_workers = {min_workers}\nmax_workers = {max_workers}\n"
        f"slot_size_bytes = {slot_size_bytes}\nbacklog_max = 10000\n{extra}\n"
    )


class Bridge:
    """A running bridge: ``unix`` (socket path), ``tcp`` (host:port), ``log()``."""

    def __init__(self, directory: Path, top: str, services: List[str]) -> None:
        self.dir = directory
        config = directory / "bridge.toml"
        config.write_text(
            f"state_dir = {toml_string(str(directory / 'state'))}\n{top}\n"
            f"[listen]\nunix = {toml_string(str(directory / 'bridge.sock'))}\n"
            f'tcp = "127.0.0.1:0"\n\n' + "".join(services))
        self._log = open(directory / "bridge.log", "wb")
        self.process = subprocess.Popen(
            [str(bridge_binary()), "serve", "--config", str(config), "--log", "info"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        line = self._ready_line()
        if not line.startswith("acgi-bridge ready"):
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"the bridge did not start: stdout {line!r}\n{self.log()}")
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        self.unix: str = fields["unix"]
        self.tcp: str = fields["tcp"]
        # Keep draining stdout so the bridge never blocks on it.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def _ready_line(self) -> str:
        stdout = self.process.stdout
        ready, _, _ = select.select([stdout], [], [], READY_TIMEOUT_SECONDS)
        if not ready:
            return ""
        return stdout.readline().decode("utf-8", "replace")

    def log(self) -> str:
        self._log.flush()
        return (self.dir / "bridge.log").read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(EXIT_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def start_bridge(top: str = "", services: Optional[List[str]] = None) -> Bridge:
    directory = Path(tempfile.mkdtemp(prefix="acgi-py-"))
    return Bridge(directory, top, services or [])


#: The services of the shared bridge, by name.
SERVICES: Dict[str, int] = {"echo": 1, "queued": 2, "unqueued": 3}


@pytest.fixture(scope="session")
def bridge():
    """One bridge for the suite: ``echo`` (2-4 workers), ``queued`` (one worker that takes up
    to 8 queued jobs), ``unqueued`` (one worker whose Hello does not ask for queued jobs)."""
    running = start_bridge(services=[
        python_service(SERVICES["echo"], "echo", min_workers=2, max_workers=4),
        python_service(SERVICES["queued"], "queued", min_workers=1, max_workers=1,
                       extra="worker_queue_depth = 8"),
        python_service(SERVICES["unqueued"], "unqueued", min_workers=1, max_workers=1,
                       extra="worker_queue_depth = 8", queued=False),
    ])
    yield running
    status = running.stop()
    assert status == 0, f"the bridge exited {status}:\n{running.log()}"


@pytest.fixture
def lone_bridge():
    """A bridge of its own, for tests that stop or signal its workers: service ``solo`` with
    exactly one worker."""
    running = start_bridge(services=[
        python_service(1, "solo", min_workers=1, max_workers=1, extra="kill_grace_ms = 20000"),
    ])
    yield running
    running.stop()


@pytest.fixture
def fake_server():
    """A listening Unix socket standing in for a bridge: ``(path, accept)`` where ``accept()``
    returns the server side of the next connection."""
    directory = tempfile.mkdtemp(prefix="acgi-fake-")
    path = os.path.join(directory, "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(10)
    accepted: List[socket.socket] = []

    def accept() -> socket.socket:
        conn, _ = listener.accept()
        conn.settimeout(10)
        accepted.append(conn)
        return conn

    yield path, accept
    for conn in accepted:
        conn.close()
    listener.close()
