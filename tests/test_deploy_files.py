"""The files an operator installs agree with the code: every key documented, names that match."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from twisted_agent.config import (
    ARI_PASSWORD_PLACEHOLDER,
    PRODUCTION_MODELS_DIR,
    SETTINGS,
    AgentConfig,
    ConfigError,
    load_config,
)

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
    # the production models directory: the default of an installed agent (a checkout uses .models)
    assert config.providers.local.models_dir == PRODUCTION_MODELS_DIR
    for info in SETTINGS:
        if info.key not in ("media.advertise_host", "store.engine_id",  # derived when empty
                            "providers.local.models_dir"):
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
    assert service["KillMode"] == "mixed"  # the engine drains; its workers are not signalled first
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


def _env_file(path: Path) -> dict[str, str]:
    """NAME=value lines, as systemd's EnvironmentFile= reads the example (no quoting used in it)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def test_example_ari_passwords_agree_and_are_refused_as_shipped():
    env_example = ROOT / "etc" / "ai-agent.env.example"
    env = _env_file(env_example)
    ari = configparser.ConfigParser(strict=False, interpolation=None, inline_comment_prefixes=(";",))
    ari.read(ROOT / "etc" / "asterisk" / "ari.conf")
    user = load_config(None, {}, lambda h, p: "127.0.0.1").ari.username
    # the same placeholder in both files: installed as shipped, the agent and Asterisk agree ...
    assert env["ARI_PASSWORD"] == ari[user]["password"] == ARI_PASSWORD_PLACEHOLDER
    # ... and the agent refuses it, naming the key, where it came from and what to do
    with pytest.raises(ConfigError) as info:
        load_config(None, env, lambda h, p: "127.0.0.1")
    assert (info.value.key, info.value.origin) == ("ARI_PASSWORD", "environment")
    assert f"example placeholder {ARI_PASSWORD_PLACEHOLDER!r}" in str(info.value)
    assert f"[{user}] user in ari.conf" in str(info.value)
    # with a password of one's own, the rest of the example loads
    config = load_config(None, {**env, "ARI_PASSWORD": "a-password-of-my-own"}, lambda h, p: "127.0.0.1")
    assert config.ari.password == "a-password-of-my-own"


#: texts from before the parts they describe were built (the call engine, the local pipeline, the
#: model installer, the cloud providers): all of them are built now
STALE_PHRASES = ("not built yet", "not yet built", "not yet implemented", "until the call engine is built",
                 "unbuilt part")


def _project_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in sorted(set(listed.decode("utf-8").split("\0")) - {""}):
        path = ROOT / name
        if path.is_file() and path != Path(__file__).resolve():  # this file names the phrases
            files.append(path)
    return files


def test_no_stale_not_built_yet_texts():
    found = []
    for path in _project_text_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            lowered = line.lower()
            found += [f"{path.relative_to(ROOT)}:{number}: {phrase!r}: {line.strip()}"
                      for phrase in STALE_PHRASES if phrase in lowered]
    assert not found, "stale texts:\n" + "\n".join(found)


def test_the_configuration_reference_has_every_setting_as_the_code_documents_it():
    """docs/configuration.md is the README's settings reference: one row per setting, with the
    meaning the code gives (config.SETTINGS), so a new or reworded setting cannot go unlisted."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[-1]
    for info in SETTINGS:
        assert info.env in rows, f"docs/configuration.md has no row for {info.env}"
        assert rows[info.env] == info.doc, f"docs/configuration.md describes {info.env} otherwise than the code"
