from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_agent import config as c
from twisted_agent.config_display import describe


def fixed_resolver(host: str, port: int) -> str:
    return "192.0.2.10"


def load(text: str | None = None, env: dict[str, str] | None = None, tmp: Path | None = None, **kw):
    path = None
    if text is not None:
        assert tmp is not None
        path = tmp / "ai-agent.yaml"
        path.write_text(text)
    return c.load_config(str(path) if path else None, env or {}, kw.pop("resolve", fixed_resolver))


def error_of(text: str | None = None, env: dict[str, str] | None = None, tmp: Path | None = None, **kw) -> str:
    with pytest.raises(c.ConfigError) as info:
        load(text, env, tmp, **kw)
    message = str(info.value)
    assert "\n" not in message, "an error is one line"
    return message


# --- defaults and the fixed names -----------------------------------------------------------


def test_defaults_without_file_or_environment():
    config = load()
    assert config.ari.url == "http://127.0.0.1:8088/ari"
    assert config.ari.app == "asterisk-ai-voice-agent"
    assert (config.media.rtp_host, config.media.rtp_port) == ("0.0.0.0", 18080)
    assert config.media.audiosocket_port == 8090
    assert config.media.transport == "externalmedia"
    assert (config.web.host, config.web.port) == ("127.0.0.1", 15000)
    assert config.store.redis_url == ""
    assert config.media.downstream_mode == "file"
    assert config.calls.default_context == "default"
    assert "default" in config.contexts
    assert config.sources["ari.url"] == "default"


def test_fixed_environment_names_map_to_settings():
    env_names = {info.env: info.key for info in c.SETTINGS}
    for name in ("ARI_URL", "ARI_USERNAME", "ARI_PASSWORD", "ARI_APP", "RTP_HOST", "RTP_PORT",
                 "RTP_ADVERTISE_HOST", "AUDIOSOCKET_PORT", "AUDIO_TRANSPORT", "HEALTH_HOST", "HEALTH_PORT",
                 "REDIS_URL", "AI_PROVIDER", "AI_CONTEXT", "DOWNSTREAM_MODE", "MEDIA_DIR", "OLLAMA_HOST"):
        assert name in env_names, name
    assert len(env_names) == len(c.SETTINGS), "every setting has its own environment variable"


def test_every_setting_is_overridable_from_the_environment(tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    # A valid non-default value for each setting, given through the environment only.
    values = {
        "ARI_URL": "https://pbx.example.net:8089/ari", "ARI_USERNAME": "bob", "ARI_PASSWORD": "pw",
        "ARI_APP": "my-app", "ARI_REQUEST_TIMEOUT": "3.5", "ARI_RECONNECT_MAX_DELAY": "12",
        "ARI_TLS_CA_FILE": str(ca_file), "REDIS_TLS_CA_FILE": str(ca_file),
        "AUDIO_TRANSPORT": "audiosocket", "RTP_HOST": "127.0.0.1", "RTP_PORT": "4000",
        "RTP_ADVERTISE_HOST": "198.51.100.7", "AUDIOSOCKET_HOST": "127.0.0.1", "AUDIOSOCKET_PORT": "4001",
        "EXTERNAL_MEDIA_FORMAT": "alaw", "RTP_ALLOWED_HOSTS": "10.0.0.0/8 192.0.2.7", "RTP_REORDER_FRAMES": "4",
        "AUDIOSOCKET_FORMAT": "slin16", "VAD_MODE": "3", "VAD_START_MS": "100", "VAD_END_MS": "500",
        "VAD_SILERO": "yes", "DOWNSTREAM_MODE": "stream", "MEDIA_DIR": "/srv/media",
        "HEALTH_HOST": "::1", "HEALTH_PORT": "4002", "ADMIN_PASSWORD_HASH": "hash",
        "REDIS_URL": "redis://127.0.0.1:6379/2", "AI_PROVIDER": "deepgram", "AI_CONTEXT": "night",
        "CONTEXT_NIGHT_GREETING": "closed",
        "MAX_CALLS": "7", "DRAIN_TIMEOUT": "5", "FALLBACK_CONTEXT": "voicemail", "FALLBACK_EXTENSION": "s",
        "FALLBACK_PRIORITY": "2", "TURN_END_MS": "700", "GATE_GUARD_MS": "100",
        "BARGE_IN": "off", "BARGE_IN_MIN_MS": "200", "TRANSFER_DIGIT": "0", "PROVIDER_TIMEOUT": "4",
        "QUEUE_TIMEOUT": "30", "SETUP_TIMEOUT": "3", "FAILURE_ACTION": "hangup", "NO_AUDIO_SECONDS": "9",
        "TRANSFER_CONTEXT": "humans",
        "TRANSFER_EXTENSION": "100", "TRANSFER_PRIORITY": "3", "WHISPER_MODEL": "base", "LLM_BACKEND": "embedded",
        "OLLAMA_HOST": "10.1.1.1:11434", "LLM_MODEL": "llama3", "TTS_VOICE": "v", "MODELS_DIR": "/srv/models",
        "STT_BACKEND": "faster-whisper", "STT_WORKERS": "2", "LLM_KEEP_ALIVE": "1h",
        "OPENAI_COMPATIBLE_URL": "http://10.0.0.7:8000/v1", "EMBEDDED_MODEL": "smollm2-135m",
        "LLM_MAX_TOKENS": "40", "LLM_TEMPERATURE": "0.7", "HISTORY_TURNS": "4", "TTS_BACKEND": "espeak",
        "LOCAL_MAX_QUEUE": "3", "REPLY_CACHE": "true", "DEEPGRAM_API_KEY": "dg", "STT_WINDOW": "30",
        "FIRST_PIECE_WORDS": "0", "SPECULATE": "no", "FILLER_MS": "900", "BARGE_IN_DUCK_DB": "6",
        "FILLER": "tone", "RINGBACK": "yes", "READY_TIMEOUT": "12",
        "INACTIVITY_PROMPT_SECONDS": "20", "INACTIVITY_HANGUP_SECONDS": "10", "STREAM_STALL_MS": "500",
        "OPENAI_API_KEY": "oa", "OPENAI_REALTIME_MODEL": "m", "LOG_FORMAT": "json", "LOG_LEVEL": "debug",
        "ADMIN_SESSION_HOURS": "2", "ADMIN_COOKIE_SECURE": "yes", "STORE_PREFIX": "pbx1", "ENGINE_ID": "engine-7",
        "STORE_HISTORY_MAX": "50", "STORE_HISTORY_DAYS": "7", "STORE_LIVE_TTL": "10", "STORE_BUFFER_MAX": "500",
        "OVERFLOW_CONTEXT": "queue", "OVERFLOW_EXTENSION": "600", "OVERFLOW_PRIORITY": "2",
        "CLOUD_CONNECT_TIMEOUT": "3", "DEEPGRAM_URL": "ws://127.0.0.1:9/agent", "DEEPGRAM_LISTEN_MODEL": "nova-2",
        "DEEPGRAM_THINK_PROVIDER": "anthropic", "DEEPGRAM_THINK_MODEL": "claude", "DEEPGRAM_SPEAK_MODEL": "aura-x",
        "OPENAI_REALTIME_URL": "ws://127.0.0.1:9/rt", "OPENAI_REALTIME_API": "beta", "OPENAI_REALTIME_AUDIO": "pcm16",
        "OPENAI_REALTIME_VOICE": "marin", "OPENAI_VAD_THRESHOLD": "0.7", "OPENAI_VAD_PREFIX_MS": "200",
        "OPENAI_VAD_SILENCE_MS": "700",
    }
    assert set(values) - {"CONTEXT_NIGHT_GREETING"} == {info.env for info in c.SETTINGS}, "cover every setting"
    config = load(env=values)
    for info in c.SETTINGS:
        assert config.sources[info.key] == "environment", info.key
        assert c.setting_value(config, info.key) != info.default, info.key
    assert config.ari.request_timeout == 3.5
    assert config.media.rtp_port == 4000
    assert config.web.host == "::1"
    assert config.providers.local.ollama_host == "http://10.1.1.1:11434"
    assert config.media.rtp_allowed_hosts == ("10.0.0.0/8", "192.0.2.7/32")
    assert config.media.vad_silero is True


def test_file_values_and_environment_precedence(tmp_path):
    text = """
ari:
  url: http://10.0.0.5:8088/ari
  username: agent
media:
  rtp_port: 20000
  transport: audiosocket
web:
  port: 16000
"""
    config = load(text, {"RTP_PORT": "20002"}, tmp_path)
    assert config.ari.url == "http://10.0.0.5:8088/ari"
    assert config.media.transport == "audiosocket"
    assert config.media.rtp_port == 20002, "the environment wins over the file"
    assert config.sources["media.rtp_port"] == "environment"
    assert config.sources["web.port"] == "file"
    assert config.sources["ari.app"] == "default"
    assert config.path == str(tmp_path / "ai-agent.yaml")


def test_empty_file_gives_defaults(tmp_path):
    assert load("", None, tmp_path).media.rtp_port == 18080
    assert load("# only comments\n", None, tmp_path).media.rtp_port == 18080


# --- the advertised media address ----------------------------------------------------------


def test_advertise_host_is_derived_from_the_ari_host():
    calls = []

    def resolver(host, port):
        calls.append((host, port))
        return "10.9.8.7"

    config = load(env={"ARI_URL": "http://10.0.0.5:8088/ari"}, resolve=resolver)
    assert calls == [("10.0.0.5", 8088)]
    assert config.media.advertise_host == "10.9.8.7"
    assert config.sources["media.advertise_host"] == "derived"


def test_advertise_host_derivation_uses_the_real_routing_table():
    config = c.load_config(None, {"ARI_URL": "http://127.0.0.1:8088/ari"})
    assert config.media.advertise_host == "127.0.0.1"


def test_advertise_host_explicit_is_not_derived():
    def resolver(host, port):
        raise AssertionError("must not be called")

    config = load(env={"RTP_ADVERTISE_HOST": "203.0.113.9"}, resolve=resolver)
    assert config.media.advertise_host == "203.0.113.9"


def test_advertise_host_must_be_an_ip_literal():
    message = error_of(env={"RTP_ADVERTISE_HOST": "pbx.example.net"})
    assert message.startswith("config error: RTP_ADVERTISE_HOST (environment) = 'pbx.example.net': ")
    assert "IP address" in message


def test_advertise_host_must_not_be_a_wildcard():
    message = error_of(env={"RTP_ADVERTISE_HOST": "0.0.0.0"})
    assert "RTP_ADVERTISE_HOST (environment)" in message and "wildcard" in message


def test_advertise_host_underivable_names_the_key():
    def resolver(host, port):
        raise OSError(101, "Network is unreachable")

    message = error_of(resolve=resolver)
    assert "RTP_ADVERTISE_HOST" in message and "Network is unreachable" in message


# --- validation errors: key, origin, what is allowed ----------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RTP_PORT": "abc"}, "RTP_PORT (environment) = 'abc': expected an integer from 1 to 65535"),
        ({"RTP_PORT": "0"}, "RTP_PORT (environment) = '0': expected an integer from 1 to 65535"),
        ({"HEALTH_PORT": "70000"}, "HEALTH_PORT (environment) = '70000': expected an integer from 1 to 65535"),
        ({"AUDIO_TRANSPORT": "websocket"}, "AUDIO_TRANSPORT (environment) = 'websocket': allowed: externalmedia, "
                                           "audiosocket"),
        ({"DOWNSTREAM_MODE": "both"}, "DOWNSTREAM_MODE (environment) = 'both': allowed: file, stream"),
        ({"ARI_URL": "http://127.0.0.1:8088"}, "ARI_URL (environment) = 'http://127.0.0.1:8088': expected an "
                                               "http:// or https:// URL ending in /ari"),
        ({"ARI_URL": "ws://127.0.0.1:8088/ari"}, "ARI_URL (environment)"),
        ({"ARI_URL": "http://127.0.0.1:99999/ari"}, "invalid port"),
        ({"ARI_APP": "has space"}, "ARI_APP (environment) = 'has space'"),
        ({"RTP_HOST": "not an address"}, "RTP_HOST (environment) = 'not an address': expected an IP address"),
        ({"HEALTH_HOST": "bad host!"}, "HEALTH_HOST (environment)"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL (environment) = 'http://x': expected empty"),
        ({"REDIS_URL": "redis://h:6379/x"}, "database number"),
        ({"MEDIA_DIR": "relative/dir"}, "MEDIA_DIR (environment) = 'relative/dir': expected an absolute path"),
        ({"AI_PROVIDER": "watson"}, "AI_PROVIDER (environment) = 'watson': allowed: local, deepgram, "
                                    "openai_realtime"),
        ({"AI_CONTEXT": "nosuch"}, "AI_CONTEXT (environment) = 'nosuch': no such context; defined: default"),
        ({"DRAIN_TIMEOUT": "-1"}, "DRAIN_TIMEOUT (environment) = '-1': expected a number from 0 to 3600"),
        ({"DRAIN_TIMEOUT": "nan"}, "DRAIN_TIMEOUT (environment) = 'nan': expected a finite number"),
        ({"QUEUE_TIMEOUT": "0.5"}, "QUEUE_TIMEOUT (environment) = '0.5': expected a number from 1 to 300"),
        ({"ARI_REQUEST_TIMEOUT": "soon"}, "ARI_REQUEST_TIMEOUT (environment) = 'soon': expected a number"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL (environment) = 'loud': allowed: debug, info, warn, error, critical"),
        ({"OLLAMA_HOST": "ftp://x"}, "OLLAMA_HOST (environment)"),
        ({"ARI_USERNAME": "  "}, "ARI_USERNAME (environment) = '  ': must not be empty"),
        ({"MAX_CALLS": "-2"}, "MAX_CALLS (environment)"),
        ({"RTP_ALLOWED_HOSTS": "10.0.0.5, pbx.local"}, "RTP_ALLOWED_HOSTS (environment) = '10.0.0.5, pbx.local': "
                                                       "'pbx.local' is not an IP address or network"),
        ({"VAD_SILERO": "maybe"}, "VAD_SILERO (environment) = 'maybe': expected a boolean"),
        ({"FILLER": "music"}, "FILLER (environment) = 'music': allowed: phrase, tone, none, or the absolute path of "
                              "a 16-bit mono WAV file"),
        ({"FILLER": "/nonexistent/hold.wav"}, "FILLER (environment) = '/nonexistent/hold.wav': cannot read "
                                              "/nonexistent/hold.wav: No such file or directory"),
        ({"FILLER": "/etc/hostname"}, "FILLER (environment) = '/etc/hostname': /etc/hostname is not usable: not a "
                                      "RIFF/WAVE file"),
        ({"VAD_MODE": "4"}, "VAD_MODE (environment) = '4': expected an integer from 0 to 3"),
    ],
)
def test_bad_environment_values_name_the_key(env, expected):
    message = error_of(env=env)
    assert message.startswith("config error: ")
    assert expected in message


def test_bad_file_value_names_key_file_and_line(tmp_path):
    message = error_of("ari:\n  app: ok\n  url: ftp://x/ari\n", None, tmp_path)
    assert message == (f"config error: ari.url (file {tmp_path}/ai-agent.yaml, line 3) = 'ftp://x/ari': "
                       "expected an http:// or https:// URL ending in /ari")


def test_yaml_types_are_checked(tmp_path):
    assert "expected an integer" in error_of("media:\n  rtp_port: [1, 2]\n", None, tmp_path)
    assert "not a boolean" in error_of("media:\n  rtp_port: true\n", None, tmp_path)
    assert load("media:\n  rtp_port: 4000\n", None, tmp_path).media.rtp_port == 4000


def test_unknown_section_and_key_are_rejected(tmp_path):
    message = error_of("aris:\n  url: x\n", None, tmp_path)
    assert "config error: aris (file" in message and "line 1" in message and "unknown key" in message
    assert "ari, calls, contexts" in message
    message = error_of("ari:\n  pasword: x\n", None, tmp_path)
    assert "ari.pasword" in message and "unknown key" in message and "password_file" in message


def test_section_must_be_a_mapping(tmp_path):
    assert "config error: media (file" in error_of("media: 5\n", None, tmp_path)
    assert "expected a mapping" in error_of("media: [a]\n", None, tmp_path)


def test_top_level_must_be_a_mapping(tmp_path):
    assert "top level must be a mapping" in error_of("- a\n- b\n", None, tmp_path)


def test_invalid_yaml_gives_line_and_column(tmp_path):
    message = error_of("ari:\n  url: [unclosed\n", None, tmp_path)
    assert message.startswith(f"config error: --config (file {tmp_path}/ai-agent.yaml): invalid YAML: line ")


def test_unreadable_file(tmp_path):
    with pytest.raises(c.ConfigError) as info:
        c.load_config(str(tmp_path / "missing.yaml"), {})
    assert "cannot read the file: No such file or directory" in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(c.ConfigError) as info:
        c.load_config(str(binary), {})
    assert "not UTF-8" in str(info.value)


def test_audiosocket_port_may_not_collide_with_the_web_site():
    message = error_of(env={"AUDIO_TRANSPORT": "audiosocket", "AUDIOSOCKET_PORT": "15000"})
    assert "AUDIOSOCKET_PORT (environment) = '15000'" in message and "web site" in message
    # The RTP listener is UDP: the same number does not collide.
    assert load(env={"RTP_PORT": "15000"}).media.rtp_port == 15000


# --- secrets ----------------------------------------------------------------------------------


def test_secrets_are_refused_in_the_file(tmp_path):
    message = error_of("ari:\n  password: hunter2\n", None, tmp_path)
    assert "ari.password" in message and "ARI_PASSWORD" in message
    assert "hunter2" not in message
    assert "secrets are not read from the config file" in message
    message = error_of("providers:\n  deepgram:\n    api_key: abc\n", None, tmp_path)
    assert "providers.deepgram.api_key" in message and "DEEPGRAM_API_KEY" in message


def test_secret_from_environment_and_from_files(tmp_path):
    secret = tmp_path / "ari-password"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o600)
    assert load(env={"ARI_PASSWORD": "direct"}).ari.password == "direct"
    assert load(env={"ARI_PASSWORD_FILE": str(secret)}).ari.password == "s3cret"
    config = load(f"ari:\n  password_file: {secret}\n", None, tmp_path)
    assert config.ari.password == "s3cret"
    assert config.sources["ari.password"] == "file"


def test_empty_secret_variable_does_not_hide_the_secret_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-file")
    config = load(env={"ARI_PASSWORD": "", "ARI_PASSWORD_FILE": str(secret)})
    assert config.ari.password == "from-file"
    assert config.secret_files == {"ari.password": str(secret)}
    assert load(env={"ARI_PASSWORD": ""}).ari.password == ""


def test_yaml_booleans_are_not_taken_as_text(tmp_path):
    message = error_of("contexts:\n  default:\n    language: no\n", None, tmp_path)
    assert "contexts.default.language" in message and "put the text in quotes" in message
    assert load("contexts:\n  default:\n    language: 'no'\n", None, tmp_path).contexts["default"].language == "no"
    message = error_of("calls:\n  fallback_context: off\n", None, tmp_path)
    assert "calls.fallback_context" in message and "= 'false'" in message


def test_ca_file_must_hold_a_certificate(tmp_path):
    pem = tmp_path / "empty.pem"
    pem.write_text("not a certificate\n")
    assert "holds no PEM certificate" in error_of(env={"ARI_TLS_CA_FILE": str(pem)})


def test_unreadable_secret_file_names_the_key(tmp_path):
    message = error_of(env={"OPENAI_API_KEY_FILE": str(tmp_path / "nope")})
    assert message.startswith("config error: OPENAI_API_KEY_FILE (environment): cannot read the secret file")


def test_secret_values_are_masked_in_describe():
    config = load(env={"ARI_PASSWORD": "topsecretvalue", "REDIS_URL": "redis://:pw123@127.0.0.1:6379/0"})
    rows = {key: (value, source) for key, _env, value, source in describe(config)}
    assert "topsecretvalue" not in rows["ari.password"][0]
    assert rows["ari.password"] == ("****ue", "environment")
    assert rows["store.redis_url"][0] == "redis://:****@127.0.0.1:6379/0"
    assert rows["media.rtp_port"] == ("18080", "default")


# --- contexts ---------------------------------------------------------------------------------


def test_contexts_from_file_and_environment(tmp_path):
    text = """
contexts:
  sales:
    greeting: Welcome to sales
    provider: openai_realtime
  support-desk:
    language: de
calls:
  default_context: sales
"""
    config = load(text, {"CONTEXT_SALES_GREETING": "Hi from env", "CONTEXT_SUPPORT_DESK_VOICE": "thorsten",
                         "CONTEXT_NIGHT_GREETING": "We are closed"}, tmp_path)
    assert config.calls.default_context == "sales"
    assert config.contexts["sales"].greeting == "Hi from env"
    assert config.contexts["sales"].provider == "openai_realtime"
    assert config.contexts["support-desk"].voice == "thorsten"
    assert config.contexts["support-desk"].language == "de"
    assert config.contexts["night"].greeting == "We are closed"
    assert "default" in config.contexts
    assert config.sources["contexts.sales.greeting"] == "environment"
    assert config.sources["contexts.sales.provider"] == "file"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("contexts: [a]\n", "config error: contexts (file"),
        ("contexts:\n  sales: 5\n", "contexts.sales (file"),
        ("contexts:\n  sales:\n    greting: hi\n", "contexts.sales.greting (file"),
        ("contexts:\n  sales:\n    provider: watson\n", "contexts.sales.provider (file"),
        ("contexts:\n  'bad name':\n    greeting: hi\n", "bad context name"),
        ("contexts:\n  sales:\n    system_prompt: ''\n", "must not be empty"),
    ],
)
def test_bad_contexts(tmp_path, text, expected):
    assert expected in error_of(text, None, tmp_path)


def test_bad_context_from_environment_names_the_variable():
    message = error_of(env={"CONTEXT_SALES_PROVIDER": "watson"})
    assert message.startswith("config error: CONTEXT_SALES_PROVIDER (environment) = 'watson'")


# --- properties -------------------------------------------------------------------------------


@given(st.integers(1, 65535))
def test_any_valid_port_from_environment(port):
    assert load(env={"RTP_PORT": str(port)}).media.rtp_port == port
    assert load(env={"RTP_PORT": f" {port} "}).media.rtp_port == port


@given(st.text(max_size=12))
def test_port_parser_accepts_exactly_the_valid_ports(raw):
    try:
        value = int(raw.strip(), 10)
        valid = 1 <= value <= 65535
    except ValueError:
        valid = False
    if valid:
        assert load(env={"RTP_PORT": raw}).media.rtp_port == int(raw.strip())
    else:
        with pytest.raises(c.ConfigError):
            load(env={"RTP_PORT": raw})


def test_config_path_resolution(tmp_path, monkeypatch):
    assert c.resolve_config_path("/x.yaml", {"AI_AGENT_CONFIG": "/y.yaml"}) == "/x.yaml"
    assert c.resolve_config_path(None, {"AI_AGENT_CONFIG": "/y.yaml"}) == "/y.yaml"
    monkeypatch.setattr(c, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    assert c.resolve_config_path(None, {}) is None
    (tmp_path / "absent.yaml").write_text("")
    assert c.resolve_config_path(None, {}) == str(tmp_path / "absent.yaml")


def test_transfer_digit_is_one_key_or_none() -> None:
    assert c.load_config(None, {"TRANSFER_DIGIT": "#"}).calls.transfer_digit == "#"
    assert c.load_config(None, {}).calls.transfer_digit == ""
    with pytest.raises(c.ConfigError, match=r"TRANSFER_DIGIT.*one of 0-9"):
        c.load_config(None, {"TRANSFER_DIGIT": "00"})


def test_a_wav_file_of_ones_own_is_a_filler(tmp_path):
    import struct

    from twisted_agent.calls.comfort import load_filler

    pcm = struct.pack("<4h", 1, -1, 2, -2) * 4000  # 16000 samples at 16 kHz: one second
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000,
                                                                                  32000, 2, 16)
    path = tmp_path / "hold.wav"
    path.write_bytes(header + b"data" + struct.pack("<I", len(pcm)) + pcm)
    config = load(env={"FILLER": str(path)})
    assert config.calls.filler == str(path)
    assert len(load_filler(config.calls.filler)) == 16000, "one second at the call's 8 kHz"
    assert load_filler("none") == b"" and len(load_filler("tone")) == 32000 and len(load_filler("phrase")) > 8000


def test_models_dir_defaults_to_the_checkout_when_run_from_one(tmp_path: Path) -> None:
    checkout = Path(__file__).resolve().parent.parent
    assert c.source_checkout() == str(checkout)
    assert c.load_config(None, {}, lambda h, p: "127.0.0.1").providers.local.models_dir == str(checkout / ".models")
    # a wheel install: the package sits in site-packages, with no project files beside it
    package = tmp_path / "lib" / "python3.11" / "site-packages" / "twisted_agent"
    package.mkdir(parents=True)
    (package / "config.py").write_text("")
    assert c.source_checkout(str(package / "config.py")) is None
    for marker in ("pyproject.toml", "setup.cfg"):
        (package.parent / marker).write_text("")
    assert c.source_checkout(str(package / "config.py")) == str(package.parent)
    assert c.PRODUCTION_MODELS_DIR == "/var/lib/ai-agent/models"
    # MODELS_DIR still wins
    config = c.load_config(None, {"MODELS_DIR": str(tmp_path)}, lambda h, p: "127.0.0.1")
    assert config.providers.local.models_dir == str(tmp_path)


# --- the example files' ARI password placeholder ------------------------------------------------


@pytest.mark.parametrize("value", ["change-me", "CHANGE-ME", " change-me "])
def test_the_example_ari_password_is_refused_from_the_environment(value):
    message = error_of(env={"ARI_PASSWORD": value})
    assert message == (
        "config error: ARI_PASSWORD (environment): still the example placeholder 'change-me' of ai-agent.env.example "
        "and ari.conf: give the [ai-agent] user in ari.conf a password of your own (e.g. `openssl rand -base64 24`) "
        "and the agent the same one")


def test_the_example_ari_password_is_refused_from_a_secret_file(tmp_path):
    secret = tmp_path / "ari-password"
    secret.write_text("change-me\n")
    os.chmod(secret, 0o600)
    message = error_of(env={"ARI_PASSWORD_FILE": str(secret), "ARI_USERNAME": "pbx-agent"})
    assert message.startswith(f"config error: ARI_PASSWORD (file {secret}): still the example placeholder 'change-me'")
    assert "[pbx-agent] user in ari.conf" in message
    message = error_of(f"ari:\n  password_file: {secret}\n", None, tmp_path)
    assert message.startswith(f"config error: ari.password (file {secret}): still the example placeholder")


def test_a_password_that_only_contains_the_placeholder_is_accepted():
    assert load(env={"ARI_PASSWORD": "change-me-not"}).ari.password == "change-me-not"
