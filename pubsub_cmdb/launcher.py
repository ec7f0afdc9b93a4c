"""`make run`: main.py and subscriber.py together, on the embedded broker unless told otherwise.

`make run BROKER=emulator` also starts Google's Pub/Sub emulator (unless PUBSUB_EMULATOR_HOST names
one already) and stops it at the end.

Ctrl-C (or SIGTERM) stops all three, subscriber first so that nothing is left half-done; if one of
them exits on its own, the others are stopped too and its exit status is passed on.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import emulator

ROOT = Path(__file__).resolve().parents[1]
EMULATOR_PORT = int(os.environ.get("EMULATOR_PORT", "8085"))


def _say(text: str) -> None:
    print(f"make run: {text}", flush=True)


def _start(script: str, env: dict) -> subprocess.Popen:
    # Its own session: Ctrl-C reaches only the launcher, which stops the children in order.
    return subprocess.Popen([sys.executable, script], cwd=ROOT, env=env, start_new_session=True)


def _stop(process: subprocess.Popen, seconds: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    env = dict(os.environ)
    emulator_process = None
    if env.get("BROKER") == "emulator" and not env.get("PUBSUB_EMULATOR_HOST"):
        if emulator.port_is_open(EMULATOR_PORT):
            _say(f"using the Pub/Sub emulator already listening on 127.0.0.1:{EMULATOR_PORT}")
        else:
            _say(f"starting the Pub/Sub emulator on 127.0.0.1:{EMULATOR_PORT} (takes a few seconds)")
            try:
                emulator_process = emulator.start(EMULATOR_PORT)
            except (FileNotFoundError, RuntimeError) as error:
                print(f"make run: {error}", file=sys.stderr)
                return 2
        env["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{EMULATOR_PORT}"

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    children: list[subprocess.Popen] = []
    status = 0
    try:
        web = _start("main.py", env)
        children.append(web)
        port = int(env.get("PORT") or 5000)
        while not emulator.port_is_open(port):
            if web.poll() is not None:
                return web.returncode
            time.sleep(0.1)
        children.append(_start("subscriber.py", env))
        _say(f"open http://localhost:{port} — Ctrl-C stops everything")
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
        status = next(child.returncode for child in children if child.poll() is not None)
    except KeyboardInterrupt:
        _say("stopping")
    finally:
        for child in reversed(children):
            _stop(child)
        if emulator_process is not None:
            emulator.stop(emulator_process)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
