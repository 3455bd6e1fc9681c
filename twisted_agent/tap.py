"""``twistd ai-agent``: command-line options and the service it runs."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.python import usage

from twisted_agent.config import AgentConfig, ConfigError, load_config, resolve_config_path
from twisted_agent.service import AgentService, StartupError


def fail(message: str, code: int = 2) -> SystemExit:
    """One line on stderr and a non-zero exit: what an operator sees instead of a traceback.

    The process's own stderr is used: once twistd has started logging, ``sys.stderr`` is a
    logging proxy.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"ai-agent: {message}\n")
    stream.flush()
    return SystemExit(code)


#: LOG_FORMAT -> the observer factory installed as twistd's ``--logger`` (both filter at LOG_LEVEL)
LOGGERS = {
    "text": "twisted_agent.logging.text_observer",
    "json": "twisted_agent.logging.json_observer",
}

#: twistd's options that decide where its text log goes (twisted.scripts._twistd_unix.UnixAppLogger)
LOGGING_OPTIONS = ("logfile", "nodaemon", "syslog", "prefix")


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the twisted-agent voice agent: ARI control, RTP/AudioSocket media and the web site "
        "(/health, /ready, /live). Every setting can also come from the environment; see "
        "etc/ai-agent.yaml."
    )
    optParameters = [
        ["config", "c", None,
         "YAML configuration file (default: $AI_AGENT_CONFIG, else /etc/ai-agent/ai-agent.yaml if present)"],
    ]

    config: AgentConfig

    def postOptions(self) -> None:
        path = resolve_config_path(self["config"], os.environ)
        try:
            self.config = load_config(path)
        except ConfigError as e:
            raise fail(str(e)) from None
        from twisted_agent import logging as agent_logging

        agent_logging.configured_level = self.config.logging.level
        parent = getattr(self, "parent", None)
        if parent is not None:
            # twistd's own options come before the sub-command's, so they are parsed already
            agent_logging.twistd_options = {name: parent[name] for name in LOGGING_OPTIONS if name in parent}
            if parent.get("logger") is None:
                # twistd resolves this name after the sub-command's options, before logging starts;
                # without it twistd's own text observer would write every level
                parent["logger"] = LOGGERS[self.config.logging.format]


class TwistdAgentService(AgentService):
    """Under twistd a start-up failure ends the process with one line and exit status 1."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as e:
            self.log.critical("cannot start: {error}", error=str(e))
            raise fail(str(e), 1) from None


def makeService(options: Any) -> AgentService:
    from twisted.internet import reactor

    config = options.config if isinstance(options, Options) else load_config(options.get("config"))
    return TwistdAgentService(config, reactor)
