"""A RabbitMQ virtual host of the benchmark's own, deleted at the end with all its queues."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PORT = 5672
USER = "guest"
PASSWORD = "guest"


def reachable(timeout_s: float = 2.0) -> bool:
    """Whether something listens on RabbitMQ's port on loopback."""
    try:
        with socket.create_connection((HOST, PORT), timeout=timeout_s):
            return True
    except OSError:
        return False


def _rabbitmqctl(*args: str, tries: int = 5) -> bool:
    """Run rabbitmqctl, trying again for a while: the server may be restarting."""
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return False
    for attempt in range(tries):
        try:
            done = subprocess.run(
                [tool, *args],
                capture_output=True,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        if done.returncode == 0:
            return True
        if attempt + 1 < tries:
            time.sleep(3.0)
    return False


def wait_reachable(timeout_s: float = 30.0) -> bool:
    """Whether RabbitMQ's port answers within `timeout_s` (it may be restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if reachable():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


class RabbitVhost:
    """A vhost named after this process; falls back to '/' (queues deleted by name)."""

    def __init__(self) -> None:
        self.name = f"tidings-bench-{os.getpid()}"
        self.own_vhost = False
        self._queues: set[str] = set()

    def create(self) -> None:
        """Make the vhost and give the guest user every permission on it."""
        made = _rabbitmqctl("add_vhost", self.name) and _rabbitmqctl(
            "set_permissions", "-p", self.name, USER, ".*", ".*", ".*"
        )
        if made:
            self.own_vhost = True
        else:
            _rabbitmqctl("delete_vhost", self.name)
            log.warning("rabbitmqctl is not usable; using vhost '/' and unique queue names")

    def ensure(self) -> bool:
        """Before a run: RabbitMQ answers and our vhost is there (a reset would drop it)."""
        if not wait_reachable(120.0):
            return False
        if self.own_vhost:
            return _rabbitmqctl("add_vhost", self.name) and _rabbitmqctl(
                "set_permissions", "-p", self.name, USER, ".*", ".*", ".*"
            )
        return True

    @property
    def url(self) -> str:
        """The AMQP URL of the vhost."""
        path = self.name if self.own_vhost else ""
        return f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{path}"

    def forget_queues(self, names: Iterable[str]) -> None:
        """Delete queues of a finished run now (needed when sharing '/')."""
        names = [name for name in names if name]
        self._queues.update(names)
        if not names:
            return
        from kombu.connection import Connection

        connection = Connection(self.url, connect_timeout=5)  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception), connection as conn:
            channel = conn.default_channel
            for name in names:
                with contextlib.suppress(Exception):
                    channel.queue_delete(name)

    def delete(self) -> None:
        """Remove the vhost (and so every queue in it); on '/', the queues we named."""
        if self.own_vhost:
            _rabbitmqctl("delete_vhost", self.name)
        else:
            self.forget_queues(self._queues)

    def server_version(self) -> str:
        """RabbitMQ's version, from the server's greeting."""
        from kombu.connection import Connection

        try:
            connection = Connection(self.url, connect_timeout=5)  # type: ignore[no-untyped-call]
            with connection as conn:
                conn.connect()
                properties = conn.connection.server_properties
                return str(properties.get("version", "unknown"))
        except Exception as exc:
            return f"unknown ({type(exc).__name__})"
