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


def test_demo_starts_the_engine_and_reports_health():
    result = subprocess.run([AI_AGENT, "demo"], env=loopback_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "GET /health -> 200" in result.stdout
    assert '"rtp_server_running": true' in result.stdout
    assert "GET /ready -> 503" in result.stdout
    assert result.stdout.rstrip().endswith("engine drained and stopped")


def test_models_install_says_it_is_not_available():
    result = subprocess.run([AI_AGENT, "models", "install"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not available in this version" in result.stderr


def test_version_and_usage():
    assert subprocess.run([AI_AGENT, "version"], capture_output=True, text=True).stdout.strip() == "0.1.0"
    result = subprocess.run([AI_AGENT], capture_output=True, text=True)
    assert result.returncode == 2 and "check" in result.stderr
