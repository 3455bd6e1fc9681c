from __future__ import annotations

import io
import os
import subprocess

import pytest

from tests.helpers import BIN, loopback_env
from twisted_agent import cli
from twisted_agent.web.auth import PasswordHash

AI_AGENT = os.path.join(BIN, "ai-agent")


def test_config_shows_sources_and_masks_secrets(capsys, monkeypatch, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("web:\n  port: 16000\n")
    for name in ("RTP_PORT", "ARI_PASSWORD", "AI_AGENT_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RTP_PORT", "4000")
    monkeypatch.setenv("ARI_PASSWORD", "very-secret-password")
    assert cli.main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["web.port"][-1] == "file" and rows["web.port"][2] == "'16000'"
    assert rows["media.rtp_port"][-1] == "environment"
    assert rows["ari.url"][-1] == "default"
    assert "very-secret-password" not in out


def test_demo_runs_a_whole_simulated_call(tmp_path):
    wav = tmp_path / "heard.wav"
    # no models: the demo says why the local pipeline cannot run, with the fix, and uses echo
    empty = tmp_path / "no-models"
    result = subprocess.run([AI_AGENT, "demo", "--wav", str(wav)], env=loopback_env(MODELS_DIR=str(empty)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "provider local cannot run here" in out and "the demo uses the echo provider" in out
    assert f"models install --models-dir {empty}" in out
    assert "agent:  Hello, how can I help you?" in out
    assert "caller: [" in out and "agent:  You spoke for 3." in out
    assert "after turn end" in out and "voice to voice" in out
    assert "channels left 0, bridges left 0, reply files left 0" in out
    import wave

    with wave.open(str(wav)) as heard:
        assert (heard.getframerate(), heard.getnchannels(), heard.getsampwidth()) == (8000, 1, 2)
        assert heard.getnframes() > 8000 * 3, "greeting and answer, on the wall clock"


def test_models_install_refuses_an_unknown_model(tmp_path):
    # an unknown name is refused before anything is installed (the real installs: tests/providers/local)
    result = subprocess.run([AI_AGENT, "models", "install", "--only", "gpt-9", "--models-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown model 'gpt-9'; choose from:" in result.stdout and "tiny.en" in result.stdout


def test_version_and_usage():
    assert subprocess.run([AI_AGENT, "version"], capture_output=True, text=True).stdout.strip() == "0.1.0"
    result = subprocess.run([AI_AGENT], capture_output=True, text=True)
    assert result.returncode == 2 and "check" in result.stderr


# --- ai-agent admin-password: at least 12 characters ----------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _printed_hash(out: str) -> str:
    line = out.strip()
    assert line.startswith("ADMIN_PASSWORD_HASH='") and line.endswith("'"), line
    return line[len("ADMIN_PASSWORD_HASH='"):-1]


@pytest.mark.parametrize("on_a_terminal", [False, True], ids=["stdin", "terminal"])
def test_admin_password_refuses_eleven_characters(monkeypatch, capsys, on_a_terminal):
    eleven = "abcdefghijk"
    asked: list[str] = []

    def getpass(prompt: str = "") -> str:
        asked.append(prompt)
        return eleven

    if on_a_terminal:
        monkeypatch.setattr("sys.stdin", _Terminal())
        monkeypatch.setattr("getpass.getpass", getpass)
    else:
        monkeypatch.setattr("sys.stdin", io.StringIO(eleven + "\n"))
    assert cli.main(["admin-password"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("ai-agent: the password is too short: 11 characters, the admin UI needs at least 12; "
                            "nothing changed\n")
    assert eleven not in captured.err
    if on_a_terminal:
        assert len(asked) == 1 and "at least 12 characters" in asked[0], "refused before asking again"


@pytest.mark.parametrize("on_a_terminal", [False, True], ids=["stdin", "terminal"])
def test_admin_password_accepts_twelve_characters(monkeypatch, capsys, on_a_terminal):
    twelve = "abcdefghijkl"
    if on_a_terminal:
        monkeypatch.setattr("sys.stdin", _Terminal())
        monkeypatch.setattr("getpass.getpass", lambda prompt="": twelve)
    else:
        monkeypatch.setattr("sys.stdin", io.StringIO(twelve + "\n"))
    assert cli.main(["admin-password"]) == 0
    assert PasswordHash.parse(_printed_hash(capsys.readouterr().out)).verify(twelve)


def test_admin_password_from_a_pipe_of_the_real_command():
    # the scripted path as an operator runs it, through the installed entry point
    short = subprocess.run([AI_AGENT, "admin-password"], input="short-pass\n", capture_output=True, text=True,
                           timeout=60, env=loopback_env())
    assert short.returncode == 2 and short.stdout == ""
    assert "at least 12" in short.stderr and "short-pass" not in short.stderr
    ok = subprocess.run([AI_AGENT, "admin-password"], input="long-enough-pass\n", capture_output=True, text=True,
                        timeout=60, env=loopback_env())
    assert ok.returncode == 0, ok.stderr
    assert PasswordHash.parse(_printed_hash(ok.stdout)).verify("long-enough-pass")
