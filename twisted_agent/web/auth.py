"""The admin UI's locks: the password hash, sessions, CSRF tokens and the login rate limiter.

Plain objects with an injected clock, so each is tested without HTTP. The Klein routes in
:mod:`twisted_agent.web.admin` only move values between requests and these.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime

SCHEME = "scrypt"
HASH_ENV = "ADMIN_PASSWORD_HASH"
#: 2**14 x 8 x 1 costs ~16 MiB and tens of ms per check: slow for a guesser, quick for a login
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
#: a hash asking for more than this is refused: the setting must not be able to exhaust memory
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
#: longer passwords are refused unchecked (a login form has no business sending megabytes to scrypt)
MAX_PASSWORD_CHARS = 1024


class MalformedHash(ValueError):
    """ADMIN_PASSWORD_HASH is not a hash this module wrote; the text says what is wrong (never the value)."""


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MalformedHash(f"the {what} is not base64") from None


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL refuses work needing more than maxmem; its own estimate is 128*r*(n+p+2) bytes
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


@dataclass(frozen=True, repr=False)
class PasswordHash:
    """``scrypt$<n>$<r>$<p>$<salt base64>$<key base64>``: parameters travel with the hash, so they can grow."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        # what `ai-agent admin-password` prints is accepted whole (e.g. as an ADMIN_PASSWORD_HASH_FILE),
        # and quotes pasted along (docker --env-file keeps them) are never part of a hash
        text = text.strip()
        if text.startswith(f"{HASH_ENV}="):
            text = text[len(HASH_ENV) + 1:]
        parts = text.strip("'\"").split("$")
        if len(parts) != 6 or parts[0] != SCHEME:
            raise MalformedHash(f"expected {SCHEME}$<n>$<r>$<p>$<salt>$<hash> "
                                "(make one with `ai-agent admin-password`)")
        try:
            n, r, p = (int(part) for part in parts[1:4])
        except ValueError:
            raise MalformedHash("n, r and p must be whole numbers") from None
        if n < 2 or n & (n - 1):
            raise MalformedHash("n must be a power of two")
        if not (1 <= r <= 64 and 1 <= p <= 16):
            raise MalformedHash("r must be 1..64 and p 1..16")
        if 128 * r * n > MAX_SCRYPT_MEMORY:
            raise MalformedHash(f"n x r asks for more than {MAX_SCRYPT_MEMORY // 2**20} MiB")
        salt = _b64decode(parts[4], "salt")
        key = _b64decode(parts[5], "hash")
        if len(salt) < 8 or len(key) < 16:
            raise MalformedHash("the salt or the hash is too short")
        return cls(n, r, p, salt, key)

    def verify(self, password: str) -> bool:
        """Whether ``password`` is the one hashed. Blocking for tens of ms: run it off the reactor thread."""
        if not password or len(password) > MAX_PASSWORD_CHARS:
            return False
        candidate = _scrypt(password, self.salt, self.n, self.r, self.p, len(self.key))
        return hmac.compare_digest(candidate, self.key)

    def __str__(self) -> str:
        return f"{SCHEME}${self.n}${self.r}${self.p}${_b64encode(self.salt)}${_b64encode(self.key)}"

    def __repr__(self) -> str:
        # a hash in a log line or a traceback is an offline-guessing gift
        return f"PasswordHash({SCHEME}, n={self.n}, r={self.r}, p={self.p})"


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    """The ADMIN_PASSWORD_HASH line for ``password``."""
    if not password:
        raise ValueError("the password is empty")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_CHARS} characters")
    salt = secrets.token_bytes(SALT_BYTES)
    return str(PasswordHash(n, r, p, salt, _scrypt(password, salt, n, r, p, KEY_BYTES)))


# --- CSRF tokens and origins ------------------------------------------------------------------


def new_token() -> str:
    """An unguessable token (256 bits) for a session id or a CSRF token."""
    return secrets.token_urlsafe(32)


def tokens_match(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; an empty or missing token never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_allowed(origin: str | None, hosts: list[str]) -> bool:
    """Whether a request's Origin header (absent: allowed) names one of ``hosts`` (Host header values).

    Only host and port are compared: behind a TLS-terminating proxy the browser says https://
    while the request reached us over plain HTTP with the same Host.
    """
    if origin is None:
        return True
    parts = urlsplit(origin.strip())
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return False  # "null" (sandboxed frames, file: pages) and anything odd
    try:
        origin_port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return False
    for host in hosts:
        candidate = urlsplit("//" + host.strip())
        try:
            port = candidate.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            continue
        if candidate.hostname == parts.hostname and port == origin_port:
            return True
    return False


# --- sessions -----------------------------------------------------------------------------------


@dataclass
class Session:
    token: str
    csrf: str
    created: float
    last_seen: float


class SessionTable:
    """Server-side sessions, forgotten after ``idle_seconds`` without a request (or on logout)."""

    def __init__(self, clock: IReactorTime, idle_seconds: float, max_sessions: int = 100) -> None:
        self._clock = clock
        self.idle_seconds = idle_seconds
        # each login makes one; a bound keeps a scripted login loop from growing the table forever
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    def create(self) -> Session:
        """A new session with a new id: a login never reuses an id the browser already had."""
        self._expire()
        while len(self._sessions) >= self.max_sessions:
            oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
            del self._sessions[oldest.token]
        now = self._clock.seconds()
        session = Session(new_token(), new_token(), now, now)
        self._sessions[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        """The live session of ``token`` (its idle timer restarts), or None."""
        self._expire()
        session = self._sessions.get(token) if token else None
        if session is not None:
            session.last_seen = self._clock.seconds()
        return session

    def peek(self, token: str | None) -> Session | None:
        """Like :meth:`get` without restarting the idle timer: an open live view is not activity."""
        self._expire()
        return self._sessions.get(token) if token else None

    def end(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def _expire(self) -> None:
        horizon = self._clock.seconds() - self.idle_seconds
        for token in [t for t, s in self._sessions.items() if s.last_seen <= horizon]:
            del self._sessions[token]


# --- the login rate limiter ---------------------------------------------------------------------


class LoginLimiter:
    """At most ``per_address`` failed logins per client address and ``overall`` in all per ``window`` s.

    An attempt is counted when it starts (:meth:`begin`), not when scrypt has answered: a burst of
    concurrent guesses cannot slip past the limit while the first ones are still being checked.
    A successful login takes its own attempt back and clears its address's failures.
    """

    def __init__(self, clock: IReactorTime, per_address: int = 5, overall: int = 50,
                 window: float = 15 * 60.0) -> None:
        self._clock = clock
        self.per_address = per_address
        self.overall = overall
        self.window = window
        self._by_address: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def _prune(self) -> None:
        horizon = self._clock.seconds() - self.window
        while self._all and self._all[0] <= horizon:
            self._all.popleft()
        for address in list(self._by_address):
            times = self._by_address[address]
            while times and times[0] <= horizon:
                times.popleft()
            if not times:
                del self._by_address[address]

    def retry_after(self, address: str) -> int:
        """Whole seconds until ``address`` may try again; 0: it may try now."""
        self._prune()
        now = self._clock.seconds()
        waits = [0.0]
        times = self._by_address.get(address)
        if times is not None and len(times) >= self.per_address:
            waits.append(times[-self.per_address] + self.window - now)
        if len(self._all) >= self.overall:
            waits.append(self._all[-self.overall] + self.window - now)
        return max(1, math.ceil(max(waits))) if max(waits) > 0 else 0

    def begin(self, address: str) -> int:
        """Count an attempt from ``address`` and return 0, or (limited) return the seconds to wait."""
        wait = self.retry_after(address)
        if wait:
            return wait
        now = self._clock.seconds()
        self._by_address.setdefault(address, deque()).append(now)
        self._all.append(now)
        return 0

    def succeeded(self, address: str) -> None:
        """The attempt :meth:`begin` counted was the right password: it was no failure."""
        self._by_address.pop(address, None)
        if self._all:
            self._all.pop()


# --- request facts ------------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def client_address(peer_host: str | None, forwarded_for: str | None) -> str:
    """The address a login attempt is counted against.

    A request from loopback carrying X-Forwarded-For came through a local reverse proxy (the
    documented HTTPS setup): its last entry, written by that proxy, names the real client. From
    anywhere else the header is ignored, as anyone can write it.
    """
    host = peer_host or "local"
    if host in LOOPBACK and forwarded_for:
        last = forwarded_for.split(",")[-1].strip()[:64]
        if last:
            return last
    return host


def local_next(path: str | None, default: str = "/admin/") -> str:
    """Where to go after logging in: an admin path on this site, else ``default`` (no open redirect)."""
    if (not path or not path.startswith("/admin/") or "\\" in path or "//" in path
            or any(ord(c) < 0x21 or ord(c) == 0x7F for c in path)):
        return default
    return path[:2000]
