"""Real services for the tests: Google's Pub/Sub emulator and the project's own processes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pubsub_cmdb import emulator as pubsub_emulator

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float, process: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def stop(process: subprocess.Popen, sig=signal.SIGTERM, seconds: float = 30) -> int:
    """Signal the process group and wait; SIGKILL if it does not stop in time. Returns the exit status."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode


@contextmanager
def emulator():
    """Start the Pub/Sub emulator on a free port; yields its host:port."""
    port = free_port()
    process = pubsub_emulator.start(port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        pubsub_emulator.stop(process)


def start_python(script: str, env: dict, log_path: Path) -> subprocess.Popen:
    """Run one of the project's entry points (main.py, subscriber.py) as a real process."""
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-u", script], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
