"""``ai-agent check``: what an operator sees for each way the set-up can be wrong."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from klein import Klein
from treq.testing import StubTreq
from twisted.internet import reactor

from tests.helpers import BIN, free_port, loopback_env
from twisted_agent import check
from twisted_agent.config import load_config


class FakeARI:
    """Just enough of ARI's REST side for the check: Basic auth, /asterisk/info, /applications/{name}."""

    app = Klein()

    def __init__(self, users=None, registered=(), status=None):
        self.users = users or {"ai-agent": "pw"}
        self.registered = set(registered)
        self.status = status
        self.requests: list[tuple[bytes, bytes]] = []

    def _auth(self, request):
        header = request.getHeader("authorization") or ""
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            return self.users.get(user) == password
        return False

    def _json(self, request, code, body):
        request.setResponseCode(code)
        request.setHeader("content-type", "application/json")
        return json.dumps(body)

    @app.route("/ari/<path:rest>")
    def any_path(self, request, rest):
        self.requests.append((request.method, request.path))
        if self.status:
            return self._json(request, self.status, {"message": "forced"})
        if not self._auth(request):
            request.setHeader("www-authenticate", 'Basic realm="Asterisk REST Interface"')
            return self._json(request, 401, {"message": "Authentication required"})
        if rest == "asterisk/info":
            return self._json(request, 200, {"system": {"version": "22.10.1", "entity_id": "00:11"}})
        if rest.startswith("applications/"):
            name = rest.split("/", 1)[1]
            if name in self.registered:
                return self._json(request, 200, {"name": name, "channel_ids": []})
            return self._json(request, 404, {"message": "Application not found"})
        return self._json(request, 404, {"message": "Resource not found"})


def config_for(**env):
    base = {"ARI_URL": "http://asterisk.test:8088/ari", "ARI_PASSWORD": "pw", "RTP_ADVERTISE_HOST": "192.0.2.1"}
    return load_config(None, {**base, **env})


@pytest_twisted.ensureDeferred
async def test_ari_answers():
    fake = FakeARI()
    results = await check.check_ari(config_for(), reactor, StubTreq(fake.app.resource()))
    assert [(r.name, r.status) for r in results] == [("ari", "ok"), ("ari app", "ok")]
    assert results[0].summary == "Asterisk 22.10.1 answers at http://asterisk.test:8088/ari as user 'ai-agent'"
    assert "Stasis app 'asterisk-ai-voice-agent' is free" in results[1].summary
    assert fake.requests == [(b"GET", b"/ari/asterisk/info"), (b"GET", b"/ari/applications/asterisk-ai-voice-agent")]


@pytest_twisted.ensureDeferred
async def test_app_already_registered_is_reported():
    fake = FakeARI(registered={"asterisk-ai-voice-agent"})
    results = await check.check_ari(config_for(), reactor, StubTreq(fake.app.resource()))
    assert results[1].status == "info" and "is registered" in results[1].summary


@pytest_twisted.ensureDeferred
async def test_wrong_password():
    results = await check.check_ari(config_for(ARI_PASSWORD="nope"), reactor,
                                    StubTreq(FakeARI().app.resource()))
    assert [r.status for r in results] == ["FAIL"]
    assert results[0].summary == "ARI at http://asterisk.test:8088/ari rejected user 'ai-agent' (401)"
    assert "ari.conf" in results[0].fix


@pytest_twisted.ensureDeferred
async def test_missing_password():
    config = load_config(None, {"ARI_URL": "http://asterisk.test:8088/ari", "RTP_ADVERTISE_HOST": "192.0.2.1"})
    results = await check.check_ari(config, reactor, StubTreq(FakeARI().app.resource()))
    assert "ARI_PASSWORD is not set" in results[0].summary


@pytest.mark.parametrize(("code", "words"), [(404, "no ARI at"), (403, "denied"), (503, "not fully booted"),
                                             (500, "answered HTTP 500")])
@pytest_twisted.ensureDeferred
async def test_http_errors_each_have_a_fix(code, words):
    results = await check.check_ari(config_for(), reactor, StubTreq(FakeARI(status=code).app.resource()))
    assert results[0].status == "FAIL" and words in results[0].summary and results[0].fix


@pytest_twisted.ensureDeferred
async def test_unreachable_ari_on_a_real_socket():
    port = free_port()
    results = await check.check_ari(config_for(ARI_URL=f"http://127.0.0.1:{port}/ari"), reactor)
    assert results == [check.CheckResult(
        "ari", "FAIL", f"ARI unreachable at http://127.0.0.1:{port}/ari: connection refused at 127.0.0.1:{port}",
        "start Asterisk and enable its HTTP server (http.conf: enabled=yes, bindaddr and bindport as in ARI_URL), "
        "then `asterisk -rx 'http show status'`")]


@pytest_twisted.ensureDeferred
async def test_silent_ari_times_out():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        config = config_for(ARI_URL=f"http://127.0.0.1:{port}/ari", ARI_REQUEST_TIMEOUT="0.3")
        results = await check.check_ari(config, reactor)
    assert results[0].status == "FAIL"
    assert "no answer from" in results[0].summary and "within 0.3s" in results[0].summary


def test_ports_free_and_in_use():
    config = config_for(RTP_HOST="127.0.0.1", RTP_PORT=str(free_port(socket.SOCK_DGRAM)),
                        AUDIOSOCKET_HOST="127.0.0.1", AUDIOSOCKET_PORT=str(free_port()),
                        HEALTH_PORT=str(free_port()))
    assert [(r.name, r.status) for r in check.check_ports(config)] == [
        ("rtp", "ok"), ("audiosocket", "info"), ("web", "ok")]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", config.media.rtp_port))
        rtp = check.check_ports(config)[0]
    assert rtp.status == "FAIL"
    assert rtp.summary == f"cannot bind udp 127.0.0.1:{config.media.rtp_port}: Address already in use"
    assert "RTP_HOST/RTP_PORT" in rtp.fix


def test_unused_transport_port_in_use_only_warns():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        config = config_for(AUDIOSOCKET_HOST="127.0.0.1", AUDIOSOCKET_PORT=str(holder.getsockname()[1]))
        audiosocket = check.check_ports(config)[1]
    assert audiosocket.status == "warn"


def test_address_not_on_this_machine():
    config = config_for(RTP_HOST="192.0.2.99")
    rtp = check.check_ports(config)[0]
    assert rtp.status == "FAIL" and "192.0.2.99" in rtp.fix


def test_media_dir(tmp_path):
    missing = check.check_media_path(config_for(MEDIA_DIR=str(tmp_path / "none")))
    assert missing[-1].status == "FAIL" and "does not exist" in missing[-1].summary
    assert "install -d" in missing[-1].fix
    ok = check.check_media_path(config_for(MEDIA_DIR=str(tmp_path)))
    assert ok[-1].status == "ok"
    streaming = check.check_media_path(config_for(MEDIA_DIR=str(tmp_path / "none"), DOWNSTREAM_MODE="stream"))
    assert [r.name for r in streaming] == ["media addr"], "no reply files in stream mode"


def test_loopback_media_address_for_a_remote_asterisk_warns():
    results = check.check_media_path(config_for(RTP_ADVERTISE_HOST="127.0.0.1"))
    assert results[0].status == "warn" and "RTP_ADVERTISE_HOST" in results[0].fix


def test_providers_default_fails_others_inform(tmp_path):
    results = check.check_providers(config_for(AI_PROVIDER="deepgram", MODELS_DIR=str(tmp_path)))
    by_label = {r.summary.split(":")[0]: r for r in results}
    assert by_label["deepgram (default)"].status == "FAIL"
    assert by_label["deepgram (default)"].fix == "set DEEPGRAM_API_KEY in the service's EnvironmentFile"
    assert by_label["local"].status == "info"


def test_local_provider_without_models_names_the_install_command(tmp_path):
    results = check.check_providers(config_for(MODELS_DIR=str(tmp_path)))
    local = next(r for r in results if r.summary.startswith("local (default)"))
    assert local.status == "FAIL"
    assert "models not installed" in local.summary and str(tmp_path) in local.summary
    # the one command the README gives for production, here with this environment and directory
    assert local.fix == f"{os.path.dirname(sys.executable)}/ai-agent models install --models-dir {tmp_path}"


def test_the_install_hint_is_the_readmes_production_command_word_for_word(monkeypatch):
    """In the service's virtual environment, with nothing installed, `ai-agent check` gives the
    README's command; that command installs libraries and models alike, so the hint cannot loop."""
    monkeypatch.setattr(sys, "executable", "/opt/ai-agent/.venv/bin/python")
    config = config_for(MODELS_DIR="/var/lib/ai-agent/models")
    local = next(r for r in check.check_providers(config) if r.summary.startswith("local (default)"))
    assert local.status == "FAIL"
    assert local.fix == "/opt/ai-agent/.venv/bin/ai-agent models install --models-dir /var/lib/ai-agent/models"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert local.fix in readme


def test_local_provider_with_one_model_missing_names_it(tmp_path):
    (tmp_path / "whisper").mkdir()
    (tmp_path / "whisper" / "tiny.en.pt").write_bytes(b"x")
    (tmp_path / "whisper" / "tiny.en.pt.sha256").write_text("0" * 64)
    results = check.check_providers(config_for(MODELS_DIR=str(tmp_path), LLM_BACKEND="embedded",
                                               EMBEDDED_MODEL="smollm2-135m", TTS_BACKEND="espeak"))
    local = next(r for r in results if r.summary.startswith("local (default)"))
    if "not installed: openai-whisper" in local.summary or "piper-tts" in local.summary:
        pytest.skip("the local extra is not installed here")
    assert local.status == "FAIL" and "'smollm2-135m'" in local.summary
    assert local.fix == f"{os.path.dirname(sys.executable)}/ai-agent models install --models-dir {tmp_path}"


def test_world_readable_secret_file_warns(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("k")
    os.chmod(secret, 0o644)
    env = {"OPENAI_API_KEY_FILE": str(secret)}
    results = check.check_secrets(load_config(None, env))
    assert results[0].status == "warn" and "chmod 640" in results[0].fix
    assert results[0].summary == f"{secret} (OPENAI_API_KEY) is readable by every user"
    os.chmod(secret, 0o640)
    assert check.check_secrets(load_config(None, env)) == []


def test_world_readable_secret_file_named_in_yaml_warns(tmp_path):
    secret = tmp_path / "ari-password"
    secret.write_text("pw")
    os.chmod(secret, 0o604)
    path = tmp_path / "c.yaml"
    path.write_text(f"ari:\n  password_file: {secret}\n")
    results = check.check_secrets(load_config(str(path), {}))
    assert [r.summary for r in results] == [f"{secret} (ARI_PASSWORD) is readable by every user"]


@pytest_twisted.ensureDeferred
async def test_redis_is_checked_as_the_store_connects(tmp_path):
    """TLS, AUTH and SELECT as the store does them, against a real redis-server: a wrong password
    or an untrusted certificate is found before the first call, not in /health after it."""
    from tests.pki import make_pki
    from tests.redis_server import RedisServer

    port = free_port()
    results = await check.check_redis(config_for(REDIS_URL=f"redis://127.0.0.1:{port}/0"), reactor)
    assert results[0].status == "warn"
    assert results[0].summary == f"Redis at 127.0.0.1:{port} unusable: connection refused by 127.0.0.1:{port}"

    server = RedisServer(tmp_path, password="right").start()
    try:
        results = await check.check_redis(config_for(REDIS_URL=f"redis://:right@127.0.0.1:{server.port}/2"), reactor)
        assert [(r.status, r.summary) for r in results] == [("ok", f"Redis answers at 127.0.0.1:{server.port}")]
        results = await check.check_redis(config_for(REDIS_URL=f"redis://:wrong@127.0.0.1:{server.port}/2"), reactor)
        assert results[0].status == "warn" and "credentials" in results[0].summary, results[0].summary
        assert "wrong" not in results[0].summary
    finally:
        server.stop()

    pki = make_pki(tmp_path)
    server = RedisServer(tmp_path, tls=pki).start()
    try:
        url = f"rediss://127.0.0.1:{server.port}/0"
        results = await check.check_redis(config_for(REDIS_URL=url, REDIS_TLS_CA_FILE=pki["ca_file"]), reactor)
        assert results[0].status == "ok", results[0].summary
        results = await check.check_redis(config_for(REDIS_URL=url), reactor)
        assert results[0].status == "warn"
        assert results[0].summary == (f"Redis at 127.0.0.1:{server.port} unusable: TLS with 127.0.0.1:{server.port} "
                                      "failed (certificate verify failed): check rediss://, the host name in "
                                      "REDIS_URL and REDIS_TLS_CA_FILE")
    finally:
        server.stop()


def test_format_results():
    text = check.format_results([check.CheckResult("ari", "FAIL", "down", "start it"),
                                 check.CheckResult("web", "ok", "fine")])
    assert text.splitlines() == ["[FAIL] ari          down", "                   fix: start it",
                                 "[ ok ] web          fine", "1 failed, 0 warnings"]


def test_cli_check_against_unreachable_ari(tmp_path):
    env = loopback_env(MEDIA_DIR=str(tmp_path), ARI_PASSWORD="pw")
    ari_port = env["ARI_URL"].split(":")[2].split("/")[0]
    result = subprocess.run([os.path.join(BIN, "ai-agent"), "check"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert f"[FAIL] ari          ARI unreachable at {env['ARI_URL']}: connection refused at 127.0.0.1:{ari_port}" \
        in lines
    fix = lines[lines.index(next(line for line in lines if line.startswith("[FAIL] ari"))) + 1]
    assert fix.strip().startswith("fix: start Asterisk and enable its HTTP server")
    assert any(line.startswith("[ ok ] rtp ") for line in lines)
    assert lines[-1].endswith("failed, 0 warnings")


def test_cli_check_bad_config_is_one_line(tmp_path):
    env = loopback_env(HEALTH_PORT="0")
    result = subprocess.run([sys.executable, "-m", "twisted_agent", "check"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "ai-agent: config error: HEALTH_PORT (environment) = '0': expected an integer from 1 " \
                            "to 65535\n"
