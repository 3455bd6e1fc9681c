from __future__ import annotations

import os
import subprocess

from tests.helpers import BIN, loopback_env
from twisted_agent import cli

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
    result = subprocess.run([AI_AGENT, "demo", "--wav", str(wav)], env=loopback_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
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
