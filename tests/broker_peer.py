"""A broker client in a process of its own, for the contract tests: they SIGKILL it, or run two at once.

    python -m tests.broker_peer publish N         publish N messages; print "published <id>" as each returns
    python -m tests.broker_peer hold MAX          subscribe; print "got <id> <attempt>" per message, never ack
    python -m tests.broker_peer work MAX SECONDS  subscribe; hold each message SECONDS, print
                                                  "held <id> <start> <end>" (Unix times), then ack

Settings come from the environment (BROKER, PUBSUB_EMULATOR_HOST, TOPIC_NAME, ...) as for main.py; the
topic and subscription must exist. Subscribers print "ready" once subscribed. `Peer` runs one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from .services import ROOT


class Peer:
    """One `python -m tests.broker_peer ...` process, its output lines collected as they come."""

    def __init__(self, env: dict, *args):
        self.process = subprocess.Popen([sys.executable, "-u", "-m", "tests.broker_peer", *map(str, args)],
                                        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def words(self, first: str) -> list[list[str]]:
        """The lines that start with `first`, split into words, without it."""
        return [line.split()[1:] for line in list(self.lines) if line.split()[:1] == [first]]

    def wait_for(self, first: str, count: int = 1, seconds: float = 60) -> list[list[str]]:
        """Wait until `count` lines start with `first`; fail with the output if the process dies or it takes too long."""
        deadline = time.monotonic() + seconds
        while len(found := self.words(first)) < count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)  # let the reader catch the last lines
                raise AssertionError(f"peer {self.process.args[4:]} has {len(self.words(first))} of {count} "
                                     f"{first!r} lines (exit status {self.process.poll()}); its output:\n"
                                     + "\n".join(self.lines))
            time.sleep(0.05)
        return found

    def kill(self):
        """SIGKILL: no clean-up of any kind, as in a crash."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._reader.join(5)


_print_lock = threading.Lock()


def say(*words) -> None:
    """One whole line on stdout, in one write: print() writes word by word, so lines from several callback
    threads would interleave, and a SIGKILL could cut one short."""
    with _print_lock:
        sys.stdout.write(" ".join(map(str, words)) + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> None:
    from pubsub_cmdb.broker import make_broker
    from pubsub_cmdb.config import load_settings

    broker = make_broker(load_settings())
    mode = argv[0]
    if mode == "publish":
        for i in range(int(argv[1])):
            say("published", broker.publish(b"peer message %d" % i, {"n": str(i)}))
        time.sleep(3600)  # published everything: wait to be killed
    hold = float(argv[2]) if mode == "work" else None

    def callback(message):
        if hold is None:
            say("got", message.message_id, message.delivery_attempt)
            threading.Event().wait()  # never ack: the lease is extended while this process lives
        start = time.time()
        time.sleep(hold)
        say("held", message.message_id, f"{start:.6f}", f"{time.time():.6f}")
        message.ack()

    streaming_pull = broker.subscribe(callback, int(argv[1]))
    say("ready")
    streaming_pull.result()


if __name__ == "__main__":
    main(sys.argv[1:])
