"""Google's Pub/Sub emulator, as shipped with the Google Cloud CLI: find it, start it, stop it.

Used by `make run` (through the launcher) and by the tests; main.py and subscriber.py only need
PUBSUB_EMULATOR_HOST.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = ("install the Google Cloud CLI with its Pub/Sub emulator "
                "(apt package google-cloud-cli-pubsub-emulator, or `gcloud components install pubsub-emulator`)")


def binary() -> str | None:
    """Path of the emulator's start script, or None where it is not installed."""
    roots = [os.environ.get("CLOUDSDK_ROOT_DIR"), "/usr/lib/google-cloud-sdk"]
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(str(Path(gcloud).resolve().parent.parent))
    for root in filter(None, roots):
        candidate = Path(root) / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
        if candidate.exists():
            return str(candidate)
    return None


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def start(port: int, log=subprocess.DEVNULL, seconds: float = 90) -> subprocess.Popen:
    """Start the emulator on 127.0.0.1:port and wait until it listens."""
    path = binary()
    if path is None:
        raise FileNotFoundError(f"the Pub/Sub emulator is not installed: {INSTALL_HINT}")
    process = subprocess.Popen([path, "--host=127.0.0.1", f"--port={port}"], stdout=log, stderr=log,
                               start_new_session=True)
    deadline = time.monotonic() + seconds
    while not port_is_open(port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"the Pub/Sub emulator did not start on port {port}")
        time.sleep(0.2)
    return process


def stop(process: subprocess.Popen, seconds: float = 10) -> None:
    """Stop the emulator and its Java child (they share a process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(seconds)
        except ProcessLookupError:
            pass
