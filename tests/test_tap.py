"""The twistd plugin and ``twistd -n ai-agent`` as an operator runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from tests.helpers import BIN, free_port, http_get, loopback_env, wait_for_http
from twisted_agent import tap
from twisted_agent.service import AgentService

TWISTD = os.path.join(BIN, "twistd")


def test_plugin_is_discovered():
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "ai-agent" in makers
    maker = makers["ai-agent"]
    assert getattr(maker, "module", None) == "twisted_agent.tap"
    assert maker.options is tap.Options


def test_plugin_module_imports_nothing_heavy():
    code = ("import sys; import importlib.util as u; "
            "spec = u.spec_from_file_location('p', 'twisted/plugins/ai_agent_plugin.py'); "
            "m = u.module_from_spec(spec); spec.loader.exec_module(m); "
            "bad = [n for n in ('twisted.internet.reactor', 'twisted_agent.tap', 'klein', 'treq', 'autobahn') "
            "if n in sys.modules]; print(bad)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_init_in_twisted_plugins():
    assert not os.path.exists("twisted/__init__.py")
    assert not os.path.exists("twisted/plugins/__init__.py")


def test_options_load_the_config(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("ari:\n  app: from-file\n")
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    assert options.config.ari.app == "from-file"
    service = tap.makeService(options)
    assert isinstance(service, AgentService)
    assert [s.name for s in service] == ["store", "ari", "media", "calls", "web"]


def test_options_bad_config_exit_with_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RTP_PORT", "nope")
    options = tap.Options()
    with pytest.raises(SystemExit) as info:
        options.parseOptions([])
    assert info.value.code == 2
    err = capfd.readouterr().err
    assert err == "ai-agent: config error: RTP_PORT (environment) = 'nope': expected an integer from 1 to 65535\n"


def run_twistd(args, env, timeout=30):
    return subprocess.run([TWISTD, "-n", "--pidfile=", "ai-agent", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("yaml_text", "env", "expected"),
    [
        ("calls:\n  max_calls: -1\n", {}, "config error: calls.max_calls (file {path}, line 2) = '-1'"),
        ("", {"AUDIO_TRANSPORT": "sip"}, "config error: AUDIO_TRANSPORT (environment) = 'sip': allowed: "),
        ("ari:\n  password: x\n", {}, "config error: ari.password (file {path}, line 2): secrets are not read"),
        ("ari: [\n", {}, "config error: --config (file {path}): invalid YAML"),
    ],
)
def test_twistd_bad_config_exits_non_zero_with_one_line(tmp_path, yaml_text, env, expected):
    path = tmp_path / "ai-agent.yaml"
    path.write_text(yaml_text)
    result = run_twistd(["--config", str(path)], {**loopback_env(), **env})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ai-agent: " + expected.format(path=path))


def test_twistd_port_in_use_exits_non_zero_with_one_line():
    import socket

    env = loopback_env()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["HEALTH_PORT"])))
        holder.listen()
        result = run_twistd([], env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"ai-agent: cannot listen for the web site on tcp (HEALTH_HOST/HEALTH_PORT): 127.0.0.1:{env['HEALTH_PORT']}: "
        f"Address already in use (another process holds the port: `ss -lntup | grep :{env['HEALTH_PORT']}`)"]


def test_twistd_serves_health_and_drains_on_sigterm(tmp_path):
    env = loopback_env(LOG_FORMAT="json")
    process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "ai-agent"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{env['HEALTH_PORT']}"
        code, health = wait_for_http(base + "/health")
        assert code == 200
        for field in ("ari_connected", "rtp_server_running", "active_calls", "providers", "audio_transport"):
            assert field in health
        assert http_get(base + "/live") == (200, {"live": True})
        assert http_get(base + "/ready")[0] == 503
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # twistd re-raises SIGTERM after a clean shutdown, as systemd expects
    assert process.returncode in (0, -signal.SIGTERM), err
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    messages = [e["message"] for e in events]
    assert any(m.startswith("shutting down: draining (0 active call(s)") for m in messages), messages
    assert messages.index("stopped") > next(i for i, m in enumerate(messages) if m.startswith("shutting down"))
    started_event = next(e for e in events if e["message"].startswith("twisted-agent "))
    assert started_event["level"] == "info" and started_event["transport"] == "externalmedia"
    assert started_event["namespace"] == "twisted_agent.tap.TwistdAgentService"


def test_twistd_help_lists_the_plugin():
    result = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=30)
    assert "ai-agent" in result.stdout


def test_free_port_helper_gives_distinct_ports():
    assert free_port() > 0


# --- LOG_FORMAT/LOG_LEVEL under twistd: both formats filtered, written where twistd would -----------


@pytest.mark.parametrize(("log_format", "observer"), [("text", "text_observer"), ("json", "json_observer")])
def test_twistd_options_install_the_filtered_observer(tmp_path, monkeypatch, log_format, observer):
    from twisted.scripts.twistd import ServerOptions

    from twisted_agent import logging as agent_logging

    monkeypatch.setattr(agent_logging, "configured_level", None)
    monkeypatch.setattr(agent_logging, "twistd_options", {})
    monkeypatch.setenv("LOG_FORMAT", log_format)
    monkeypatch.setenv("LOG_LEVEL", "warn")
    logfile = str(tmp_path / "agent.log")
    options = ServerOptions()
    options.parseOptions(["-n", "--pidfile=", "--logfile", logfile, "ai-agent"])
    assert options["logger"] is getattr(agent_logging, observer)
    assert agent_logging.configured_level == "warn"
    assert agent_logging.twistd_options["logfile"] == logfile and agent_logging.twistd_options["nodaemon"]


def test_twistd_logger_option_wins(monkeypatch):
    from twisted.scripts.twistd import ServerOptions

    from twisted_agent import logging as agent_logging

    monkeypatch.setattr(agent_logging, "configured_level", None)
    monkeypatch.setattr(agent_logging, "twistd_options", {})
    monkeypatch.setenv("LOG_FORMAT", "text")
    options = ServerOptions()
    options.parseOptions(["-n", "--logger", "twisted_agent.logging.json_observer", "ai-agent"])
    assert options["logger"] is agent_logging.json_observer


def run_agent_until_it_retried(args, env, until, timeout=30.0):
    """Run ``twistd -n ai-agent`` against an ARI port nobody listens on until ``until(stdout)`` holds (or
    the time is up), then stop it; its stdout, stderr and exit code."""
    process = subprocess.Popen([TWISTD, "-n", "--pidfile=", *args, "ai-agent"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{env['HEALTH_PORT']}/live")
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return out, err, process.returncode


def test_twistd_text_log_at_info_has_no_debug_and_no_twisted_chatter(tmp_path):
    # -l: the text log goes to the file, as twistd's own would; two failed reconnections are in it
    logfile = tmp_path / "agent.log"
    # the echo provider: no models to load, so the agent is up at once
    env = loopback_env(LOG_FORMAT="text", LOG_LEVEL="info", MEDIA_DIR=str(tmp_path), AI_PROVIDER="echo")

    def retried_twice():
        return logfile.exists() and "Scheduling retry 2 to connect" in logfile.read_text()

    out, err, code = run_agent_until_it_retried(["--logfile", str(logfile)], {**env, "LOG_LEVEL": "debug"},
                                                retried_twice)
    assert code in (0, -signal.SIGTERM), err
    text = logfile.read_text()
    assert out == "" and "#debug] Scheduling retry 2 to connect" in text, "at debug the chatter is there"

    logfile.unlink()
    out, err, code = run_agent_until_it_retried(["--logfile", str(logfile)], env, lambda: False, timeout=4.0)
    assert code in (0, -signal.SIGTERM), err
    text = logfile.read_text()
    assert out == ""
    assert "#info] twisted-agent " in text and "#warn] ARI events: cannot connect to ws://127.0.0.1:" in text
    assert "#debug]" not in text
    for chatter in ("Scheduling retry", "Starting factory", "Stopping factory"):
        assert chatter not in text, text
