"""Drive the real processes over loopback: main.py, subscriber.py, and the browser-facing pages."""
from __future__ import annotations

import html
import re
import sqlite3
import time
from pathlib import Path

import requests

from . import services

CSRF = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')


def eventually(check, seconds=30.0, interval=0.2, what="condition"):
    """Poll `check` until it returns something truthy; fail with `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(interval)


class System:
    """main.py (and, when asked, subscriber.py) as real processes on one environment."""

    def __init__(self, env: dict, logs: Path):
        self.env = env
        self.logs = logs
        self.url = env["SERVER_ADDRESS"]
        self.web = None
        self.subscriber = None
        self.browser = requests.Session()  # keeps the session cookie, as a browser does

    # processes -----------------------------------------------------------------------------------
    def start_web(self):
        self.web = services.start_python("main.py", self.env, self.logs / "main.log")
        if not services.wait_for_port(int(self.env["PORT"]), 60, self.web):
            raise AssertionError(f"main.py did not start:\n{self.log('main')}")

    def start_subscriber(self):
        self.subscriber = services.start_python("subscriber.py", self.env, self.logs / "subscriber.log")
        eventually(lambda: "subscriber.py: pulling" in self.log("subscriber") or self.subscriber.poll() is not None,
                   60, what="subscriber.py to start")
        assert self.subscriber.poll() is None, self.log("subscriber")

    def stop_subscriber(self) -> int:
        status = services.stop(self.subscriber)
        self.subscriber = None
        return status

    def stop(self):
        for process in (self.subscriber, self.web):
            if process is not None:
                services.stop(process)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # pages ---------------------------------------------------------------------------------------
    def csrf_token(self, page="/message") -> str:
        return CSRF.search(self.browser.get(self.url + page).text).group(1)

    def publish(self, action, vm_name, namespace="Customer 1", message="hello") -> requests.Response:
        form = {"csrf_token": self.csrf_token(), "action": action, "vm_name": vm_name, "namespace": namespace,
                "message": message}
        return self.browser.post(self.url + "/message", data=form)

    def page_with(self, path: str, *needles: str, seconds: float = 30) -> str:
        """The page at `path` (unescaped) once it shows every needle."""
        def fetch():
            page = html.unescape(self.browser.get(self.url + path).text)
            return page if all(n in page for n in needles) else None
        return eventually(fetch, seconds, what=f"{', '.join(needles)} on {path}")

    def messages_page(self) -> str:
        return html.unescape(self.browser.get(self.url + "/messages").text)

    def ack(self, ack_id: str) -> requests.Response:
        return self.browser.post(f"{self.url}/ack/{ack_id}", data={"csrf_token": self.csrf_token()})

    def records(self) -> list[tuple[str, str, str]]:
        with sqlite3.connect(self.env["CMDB_DATABASE"]) as con:
            return con.execute("SELECT namespace, vm_name, message FROM vms ORDER BY id").fetchall()

    def event_log(self) -> list[tuple[str, str, str]]:
        with sqlite3.connect(self.env["CMDB_DATABASE"]) as con:
            return con.execute("SELECT action, vm_name, outcome FROM events ORDER BY rowid").fetchall()


def nothing_comes(broker, seconds: float) -> None:
    """Pull every half second for `seconds`: the subscription must stay empty."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pulled = broker.pull(10)
        assert pulled == [], f"unexpected delivery of {[m.message_id for m in pulled]}"
        time.sleep(0.5)


def pulled_rows(page: str) -> dict[str, str]:
    """vm_name → ack id for each message row of a /messages page."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ack = re.search(r'action="/ack/([^"]+)"', row)
        if cells and ack:
            rows[cells[2].strip()] = ack.group(1)
    return rows
