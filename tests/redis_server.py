"""A real redis-server for tests: on loopback, a free port, its data in the test's directory.

The append-only file is fsynced on every write, so a server killed with SIGKILL and restarted on the
same port and directory comes back with everything it had acknowledged, as a production Redis with
AOF would. Nothing is saved as RDB snapshots (``--save ""``).

Without redis-server the tests that need it skip, except when ``CI`` is set, where they fail: CI is
supposed to have it, and a silently skipped store suite would hide a broken Redis store.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.helpers import free_port, unavailable

REDIS_SERVER = "/usr/bin/redis-server"


def require_redis_server() -> str:
    """The redis-server binary; skips the calling test without one (fails it when ``CI`` is set)."""
    binary = REDIS_SERVER if os.path.exists(REDIS_SERVER) else shutil.which("redis-server")
    if binary:
        return binary
    message = "redis-server not installed: the Redis store tests need it (apt-get install redis-server)"
    unavailable(message)


def _encode(*args: Any) -> bytes:
    parts = [str(a).encode() if not isinstance(a, bytes) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _read_reply(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise ConnectionError("redis-server closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)[:-2]
        return data.decode()
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise RuntimeError(f"unexpected reply {line!r}")


class RedisServer:
    def __init__(self, tmp_path: Path, password: str = "", tls: dict[str, Any] | None = None) -> None:
        self.binary = require_redis_server()
        self.port = free_port()
        self.password = password
        #: tests.pki.make_pki(): serve TLS only (rediss://), with its server certificate
        self.tls = tls
        self.dir = tmp_path / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert_file"],
                 "--tls-key-file", self.tls["key_file"], "--tls-auth-clients", "no"] if self.tls else \
            ["--port", str(self.port)]
        argv = [self.binary, *ports, "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log"), "--daemonize", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            try:
                if self.command("PING") == "PONG":
                    return self
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")
            time.sleep(0.02)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        if not self.tls:
            return sock
        context = ssl.create_default_context(cafile=self.tls["ca_file"])
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

    def command(self, *args: Any) -> Any:
        """One command on a fresh connection, synchronously: for test setup and inspection only
        (loopback, answered in microseconds)."""
        with self._connect() as sock:
            reader = sock.makefile("rb")
            if self.password:
                sock.sendall(_encode("AUTH", self.password))
                _read_reply(reader)
            sock.sendall(_encode(*args))
            return _read_reply(reader)

    def keys(self, db: int = 0) -> list[str]:
        """Every key in ``db`` (SCAN, as an operator would)."""
        found: list[str] = []
        with self._connect() as sock:
            reader = sock.makefile("rb")
            if self.password:
                sock.sendall(_encode("AUTH", self.password))
                _read_reply(reader)
            sock.sendall(_encode("SELECT", db))
            _read_reply(reader)
            cursor = "0"
            while True:
                sock.sendall(_encode("SCAN", cursor, "COUNT", 1000))
                cursor, batch = _read_reply(reader)
                found += batch
                if cursor == "0":
                    return sorted(found)

    def kill(self) -> None:
        """SIGKILL, as a crash would; waits until the process is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server still accepts connections (the kernel does) but answers nothing, as a
        hung or swapping Redis would."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        """Start again on the same port, with the same directory (and so the same data)."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
