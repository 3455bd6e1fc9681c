"""The files an operator installs agree with the code: every key documented, names that match."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import yaml

from twisted_agent.config import SETTINGS, AgentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads_and_documents_every_key():
    path = ROOT / "etc" / "ai-agent.yaml"
    config = load_config(str(path), {}, lambda host, port: "127.0.0.1")
    assert isinstance(config, AgentConfig)
    document = yaml.safe_load(path.read_text())
    text = path.read_text()
    for info in SETTINGS:
        if info.secret:
            assert info.env in text, f"{info.env} is not explained in {path}"
            continue
        node = document
        for part in info.key.split("."):
            assert isinstance(node, dict) and part in node, f"{info.key} is missing from {path}"
            node = node[part]
        assert info.env in text, f"{path} does not name {info.env} for {info.key}"
    # The example keeps the shipped defaults, so it documents what an empty file means.
    defaults = load_config(None, {}, lambda host, port: "127.0.0.1")
    for info in SETTINGS:
        if info.key not in ("media.advertise_host", "store.engine_id"):  # derived when empty
            assert config.sources.get(info.key) in ("file", "default")
            assert _value(config, info.key) == _value(defaults, info.key), info.key


def _value(config: AgentConfig, key: str) -> object:
    value: object = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def test_systemd_unit():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "systemd" / "ai-agent.service")
    service = parser["Service"]
    assert "twistd -n --pidfile= ai-agent --config /etc/ai-agent/ai-agent.yaml" in service["ExecStart"]
    assert service["Restart"] == "on-failure"
    assert service["User"] == "ai-agent"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/ai-agent/ai-agent.env"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    media_dir = load_config(None, {}, lambda h, p: "127.0.0.1").media.media_dir
    assert any(media_dir.startswith(path) for path in service["ReadWritePaths"].split())
    drain = load_config(None, {}, lambda h, p: "127.0.0.1").calls.drain_timeout
    stop = int(re.sub(r"s$", "", service["TimeoutStopSec"]))
    assert stop > drain, "systemd must not kill the engine while it drains"


def test_asterisk_snippets_match_the_defaults():
    config = load_config(None, {}, lambda h, p: "127.0.0.1")
    dialplan = (ROOT / "etc" / "asterisk" / "extensions_custom.conf").read_text()
    assert "[from-ai-agent]" in dialplan
    assert f"Stasis({config.ari.app}" in dialplan
    assert "AI_PROVIDER" in dialplan and "AI_CONTEXT" in dialplan
    ari = (ROOT / "etc" / "asterisk" / "ari.conf").read_text()
    assert f"[{config.ari.username}]" in ari and "type=user" in ari.replace(" ", "")
    http = (ROOT / "etc" / "asterisk" / "http.conf").read_text()
    assert "enabled=yes" in http.replace(" ", "") and "bindport=8088" in http.replace(" ", "")


def test_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    for name in ("ARI_URL", "RTP_ADVERTISE_HOST", "AUDIO_TRANSPORT", "DOWNSTREAM_MODE", "MEDIA_DIR"):
        assert name in readme


def test_licenses_present():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    notices = (ROOT / "THIRD_PARTY_NOTICES.md").read_text()
    assert "piper-tts" in notices and "GPL" in notices
