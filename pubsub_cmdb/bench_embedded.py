"""How fast is the embedded broker? `python -m pubsub_cmdb.bench_embedded --n 20000`

Publishes N seed-format messages to a fresh sqlite file (one thread, each publish committed and fsynced
before the next), then drains that backlog with `subscribe` and a callback that only acks (the ceiling of
subscriber.py on this broker), and prints both rates. Then the same backlog drained into the CMDB by
the real `main.py` and `subscriber.py`, timed from the first row to the last, as ../shared/bench/drain.py
does on the emulator.
"""
from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import events
from .config import load_settings
from .embedded_broker import EmbeddedBroker


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="messages to publish and drain")
    parser.add_argument("--max-messages", type=int, default=100, help="flow control of subscribe (subscriber.py: 100)")
    parser.add_argument("--dir", help="where to put the sqlite file (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        settings = load_settings({"BROKER": "embedded", "CMDB_DATABASE": str(Path(folder) / "cmdb.sqlite"),
                                  "PUBSUB_DATABASE": str(Path(folder) / "pubsub.sqlite"), "SECRET": "bench"})
        with EmbeddedBroker(settings) as broker:
            broker.provision()
            data, attributes = events.to_pubsub(events.Event("create", "vm", "Customer 1", "benchmark"))
            started = time.perf_counter()
            for i in range(args.n):
                broker.publish(data, dict(attributes, vm_name=f"vm-{i}"))
            published = time.perf_counter() - started
            print(f"publish: {args.n} messages in {published:.2f} s = {args.n / published:,.0f} msg/s "
                  f"(one thread, fsynced each)")

            acked = 0
            all_acked = threading.Event()
            lock = threading.Lock()

            def callback(message):
                nonlocal acked
                message.ack()
                with lock:
                    acked += 1
                    if acked == args.n:
                        all_acked.set()

            started = time.perf_counter()
            streaming_pull = broker.subscribe(callback, args.max_messages)
            if not all_acked.wait(max(60.0, args.n / 500)):
                raise SystemExit(f"drain: only {acked} of {args.n} acked in time")
            streaming_pull.cancel()  # returns once the last acks are committed
            drained = time.perf_counter() - started
            left = broker._con().execute("SELECT count(*) FROM deliveries").fetchone()[0]
            print(f"drain: {args.n} messages in {drained:.2f} s = {args.n / drained:,.0f} msg/s "
                  f"(subscribe, max_messages={args.max_messages}, callback acks only; {left} left unacked)")


        drain_into_cmdb(args.n, Path(folder) / "project")


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("SELECT count(*) FROM vms").fetchone()[0]
    except sqlite3.Error:
        return 0


def drain_into_cmdb(n: int, folder: Path, limit: float = 240) -> None:
    """Publish n creates, start main.py and subscriber.py on them, time the rows appearing in the CMDB."""
    folder.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, BROKER="embedded", CMDB_DATABASE=str(folder / "cmdb.sqlite"),
               PUBSUB_DATABASE=str(folder / "pubsub.sqlite"), PORT=str(port),
               SERVER_ADDRESS=f"http://127.0.0.1:{port}", SECRET="bench")
    with EmbeddedBroker(load_settings(env)) as broker:
        broker.provision()
        stamp = time.strftime("%H:%M:%S")
        for i in range(n):
            event = events.Event("create", f"bench-vm-{i}", "Customer 1", f"{stamp} - bench {i}")
            broker.publish(*events.to_pubsub(event), events.ordering_key(event))
    root = Path(__file__).resolve().parents[1]
    processes = [subprocess.Popen([sys.executable, script], cwd=root, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for script in ("main.py", "subscriber.py")]
    try:
        started, first, count = time.monotonic(), None, 0
        while time.monotonic() - started < limit and count < n:
            count = _rows(folder / "cmdb.sqlite")
            if count and first is None:
                first = time.monotonic()
            time.sleep(0.02)
        seconds = time.monotonic() - (first or started)
        print(f"drain into the CMDB: {count}/{n} rows in {seconds:.2f} s = {count / seconds:,.0f} msg/s "
              f"(main.py + subscriber.py, first row to last)")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)


if __name__ == "__main__":
    main()
