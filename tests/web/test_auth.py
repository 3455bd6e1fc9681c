"""The admin UI's locks without HTTP: password hashes, sessions, CSRF tokens, origins, the login limiter,
and the ``ai-agent admin-password`` command that makes the hash."""

from __future__ import annotations

import base64
import io

import pytest
from twisted.internet.task import Clock

from twisted_agent import cli
from twisted_agent.web.auth import (
    LoginLimiter,
    MalformedHash,
    PasswordHash,
    SessionTable,
    client_address,
    hash_password,
    local_next,
    new_token,
    origin_allowed,
    tokens_match,
)

#: cheap parameters for tests that hash many times; the format is the same
FAST = {"n": 2**4, "r": 1, "p": 1}


# --- password hashes ----------------------------------------------------------------------------


def test_a_default_hash_verifies_its_password_only():
    line = hash_password("correct horse battery staple")
    scheme, n, r, p, salt, key = line.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(key)) == 32
    parsed = PasswordHash.parse(line)
    assert parsed.verify("correct horse battery staple")
    assert not parsed.verify("correct horse battery stapl")
    assert not parsed.verify("")
    assert str(parsed) == line


def test_each_hash_has_its_own_salt():
    first, second = hash_password("same", **FAST), hash_password("same", **FAST)
    assert first != second
    assert PasswordHash.parse(first).verify("same") and PasswordHash.parse(second).verify("same")


def test_the_parameters_travel_with_the_hash():
    line = hash_password("pw", n=2**5, r=2, p=2)
    parsed = PasswordHash.parse(line)
    assert (parsed.n, parsed.r, parsed.p) == (2**5, 2, 2)
    assert parsed.verify("pw")


def test_quotes_and_the_variable_name_pasted_with_the_hash_are_ignored():
    line = hash_password("pw", **FAST)
    assert PasswordHash.parse(f"'{line}'\n").verify("pw")
    assert PasswordHash.parse(f'"{line}"').verify("pw")
    assert PasswordHash.parse(f"ADMIN_PASSWORD_HASH='{line}'\n").verify("pw"), "the admin-password line, whole"


def test_unicode_and_overlong_passwords():
    assert PasswordHash.parse(hash_password("pässwörd ✓", **FAST)).verify("pässwörd ✓")
    with pytest.raises(ValueError, match="empty"):
        hash_password("")
    with pytest.raises(ValueError, match="longer than"):
        hash_password("x" * 2000)
    assert not PasswordHash.parse(hash_password("x", **FAST)).verify("x" * 2000)


def test_the_hash_never_shows_in_its_repr():
    parsed = PasswordHash.parse(hash_password("pw", **FAST))
    assert base64.b64encode(parsed.key).decode() not in repr(parsed)
    assert base64.b64encode(parsed.salt).decode() not in repr(parsed)


@pytest.mark.parametrize(("text", "problem"), [
    ("", "expected scrypt"),
    ("hunter2", "expected scrypt"),
    ("bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "expected scrypt"),
    ("scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==", "expected scrypt"),
    ("scrypt$lots$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "whole numbers"),
    ("scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "power of two"),
    ("scrypt$16384$0$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "r must be"),
    ("scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "MiB"),
    ("scrypt$16384$8$1$not base64!$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "salt is not base64"),
    ("scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$%%%", "hash is not base64"),
    ("scrypt$16384$8$1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "too short"),
])
def test_malformed_hashes_are_refused_with_a_reason(text, problem):
    with pytest.raises(MalformedHash, match=problem):
        PasswordHash.parse(text)


# --- tokens and origins -------------------------------------------------------------------------


def test_tokens_are_long_random_and_compared_exactly():
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 43 for t in tokens)
    token = new_token()
    assert tokens_match(token, token)
    assert not tokens_match(token, token[:-1])
    assert not tokens_match(token, new_token())
    assert not tokens_match(token, "") and not tokens_match(token, None)
    assert not tokens_match("", "") and not tokens_match(None, None)
    assert not tokens_match(token, "é" + token)


@pytest.mark.parametrize(("origin", "hosts", "allowed"), [
    (None, ["127.0.0.1:15000"], True),
    ("http://127.0.0.1:15000", ["127.0.0.1:15000"], True),
    ("https://pbx.example.com", ["pbx.example.com"], True),
    ("https://pbx.example.com", ["pbx.example.com:443"], True),
    ("http://pbx.example.com", ["pbx.example.com:80"], True),
    ("https://PBX.example.com", ["pbx.example.com"], True),
    ("http://127.0.0.1:15001", ["127.0.0.1:15000"], False),
    ("http://evil.example", ["127.0.0.1:15000"], False),
    ("http://127.0.0.1:15000.evil.example", ["127.0.0.1:15000"], False),
    ("null", ["127.0.0.1:15000"], False),
    ("file://", ["127.0.0.1:15000"], False),
    ("http://127.0.0.1:99999", ["127.0.0.1:99999"], False),
    ("http://127.0.0.1:15000", [], False),
    ("https://pbx.example.com", ["127.0.0.1:15000", "pbx.example.com"], True),
])
def test_origins(origin, hosts, allowed):
    assert origin_allowed(origin, hosts) is allowed


def test_the_client_address_trusts_x_forwarded_for_from_loopback_only():
    assert client_address("203.0.113.9", None) == "203.0.113.9"
    assert client_address("203.0.113.9", "198.51.100.1") == "203.0.113.9"
    assert client_address("127.0.0.1", "198.51.100.1") == "198.51.100.1"
    # the proxy appends the address it saw: earlier entries are the client's own words
    assert client_address("::1", "10.0.0.1, 198.51.100.1") == "198.51.100.1"
    assert client_address("127.0.0.1", " ") == "127.0.0.1"
    assert client_address(None, None) == "local"


@pytest.mark.parametrize(("path", "where"), [
    ("/admin/calls/1700000000.1?x=1", "/admin/calls/1700000000.1?x=1"),
    ("/admin/history", "/admin/history"),
    (None, "/admin/"), ("", "/admin/"),
    ("https://evil.example/admin/", "/admin/"), ("//evil.example/admin/", "/admin/"),
    ("/admin//evil.example", "/admin/"), ("/admin/\\evil", "/admin/"), ("/health", "/admin/"),
    ("/admin/\r\nSet-Cookie: x=1", "/admin/"), ("javascript:alert(1)", "/admin/"),
])
def test_only_admin_paths_on_this_site_are_followed_after_login(path, where):
    assert local_next(path) == where


# --- sessions -----------------------------------------------------------------------------------


def test_sessions_expire_after_idle_time_not_while_used():
    clock = Clock()
    table = SessionTable(clock, idle_seconds=3600)
    session = table.create()
    assert session.token != session.csrf
    for _ in range(5):
        clock.advance(3000)
        assert table.get(session.token) is session, "each use restarts the idle timer"
    clock.advance(3599)
    assert table.peek(session.token) is session
    clock.advance(1)
    assert table.get(session.token) is None
    assert len(table) == 0


def test_peeking_does_not_keep_a_session_alive():
    clock = Clock()
    table = SessionTable(clock, idle_seconds=100)
    session = table.create()
    for _ in range(9):
        clock.advance(10)
        assert table.peek(session.token) is session
    clock.advance(10)
    assert table.peek(session.token) is None


def test_sessions_are_new_each_time_and_end_on_logout():
    table = SessionTable(Clock(), idle_seconds=100)
    first, second = table.create(), table.create()
    assert first.token != second.token and first.csrf != second.csrf
    table.end(first.token)
    assert table.get(first.token) is None and table.get(second.token) is second
    assert table.get(None) is None and table.get("") is None and table.get("made-up") is None
    table.end(None)


def test_the_session_table_is_bounded_oldest_out():
    clock = Clock()
    table = SessionTable(clock, idle_seconds=1000, max_sessions=3)
    sessions = []
    for _ in range(4):
        sessions.append(table.create())
        clock.advance(1)
    assert len(table) == 3
    assert table.get(sessions[0].token) is None
    assert all(table.get(s.token) is s for s in sessions[1:])


# --- the login limiter --------------------------------------------------------------------------


def test_five_failures_per_address_then_wait_out_the_window():
    clock = Clock()
    limiter = LoginLimiter(clock, per_address=5, overall=50, window=900)
    for _ in range(5):
        assert limiter.begin("198.51.100.1") == 0
        clock.advance(10)
    wait = limiter.begin("198.51.100.1")
    assert wait == 900 - 50
    assert limiter.retry_after("198.51.100.1") == wait, "a refused attempt is not counted"
    assert limiter.begin("198.51.100.2") == 0, "other addresses are not punished"
    clock.advance(wait - 1)
    assert limiter.begin("198.51.100.1") > 0
    clock.advance(1)
    assert limiter.begin("198.51.100.1") == 0, "the oldest failure left the window"
    assert limiter.begin("198.51.100.1") > 0


def test_an_overall_cap_stops_a_spread_out_guesser():
    clock = Clock()
    limiter = LoginLimiter(clock, per_address=5, overall=50, window=900)
    for n in range(50):
        assert limiter.begin(f"10.0.{n // 256}.{n % 256}") == 0
    assert limiter.begin("192.0.2.77") == 900
    clock.advance(900)
    assert limiter.begin("192.0.2.77") == 0


def test_a_success_takes_its_attempt_back_and_clears_the_address():
    clock = Clock()
    limiter = LoginLimiter(clock, per_address=3, overall=6, window=900)
    for _ in range(2):
        limiter.begin("a")
    limiter.begin("a")
    limiter.succeeded("a")
    for _ in range(3):
        assert limiter.begin("a") == 0, "the earlier failures were forgiven"
    assert limiter.begin("a") > 0
    assert limiter.begin("b") == 0, "overall: 2 + 3 failures, the success not among them: room for one more"
    assert limiter.begin("c") > 0


def test_attempts_count_when_they_start():
    # five guesses in flight at once (scrypt not done with any): the sixth is refused already
    limiter = LoginLimiter(Clock(), per_address=5)
    assert [limiter.begin("a") for _ in range(5)] == [0] * 5
    assert limiter.begin("a") > 0


# --- ai-agent admin-password --------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def printed_hash(out: str) -> str:
    line = out.strip()
    assert line.startswith("ADMIN_PASSWORD_HASH='") and line.endswith("'"), line
    return line[len("ADMIN_PASSWORD_HASH='"):-1]


def test_admin_password_reads_one_line_from_a_pipe(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret passphrase\nignored\n"))
    assert cli.main(["admin-password"]) == 0
    captured = capsys.readouterr()
    assert PasswordHash.parse(printed_hash(captured.out)).verify("s3cret passphrase")
    assert "s3cret" not in captured.err and "EnvironmentFile" in captured.err


def test_admin_password_asks_twice_on_a_terminal(monkeypatch, capsys):
    answers = iter(["typed it twice", "typed it twice"])
    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert cli.main(["admin-password"]) == 0
    assert PasswordHash.parse(printed_hash(capsys.readouterr().out)).verify("typed it twice")


def test_admin_password_refuses_a_mismatch_or_nothing(monkeypatch, capsys):
    answers = iter(["first long password", "second long password"])
    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert cli.main(["admin-password"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "differ" in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["admin-password"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "empty" in captured.err
