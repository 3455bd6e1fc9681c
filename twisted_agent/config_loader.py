"""Loading the configuration: the YAML file, then environment overrides, then cross-field rules.

Every error is a :class:`~twisted_agent.config.ConfigError` whose one line names the key, where the
value came from (file and line, or environment) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import yaml

from twisted_agent import settings as s
from twisted_agent.config import (
    ARI_PASSWORD_PLACEHOLDER,
    CONTEXT_ENV_PREFIX,
    CONTEXT_FIELDS,
    SETTINGS_BY_KEY,
    AgentConfig,
    ConfigError,
    ContextConfig,
    _section_type,
    env_token,
    local_address_towards,
    setting_value,
)

AddressResolver = Callable[[str, int], str]


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    resolve_address: AddressResolver = local_address_towards,
) -> AgentConfig:
    """Load the YAML file at ``path`` (if any), apply environment overrides, validate."""
    env = dict(os.environ if environ is None else environ)
    document, lines = _read_yaml(path) if path else ({}, {})
    loader = _Loader(path, document, lines, env)
    config = loader.build()
    return _finish(config, loader, resolve_address)


def _read_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    origin = f"file {path}"
    try:
        with open(path, encoding="utf-8") as stream:
            source = stream.read()
    except OSError as e:
        raise ConfigError("--config", origin, f"cannot read the file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", origin, "the file is not UTF-8 text") from None
    try:
        node = yaml.compose(source, Loader=yaml.SafeLoader)
        document = yaml.safe_load(source)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("--config", origin, f"invalid YAML: {where}{problem}") from None
    if document is None:
        return {}, {}
    if not isinstance(document, dict):
        raise ConfigError("--config", origin, "the top level must be a mapping of sections (ari:, media:, ...)")
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines)
    return document, lines


def _collect_lines(node: yaml.Node | None, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key + ".", lines)


class _Loader:
    def __init__(self, path: str | None, document: dict[str, Any], lines: dict[str, int],
                 environ: dict[str, str]) -> None:
        self.path = path
        self.document = document
        self.lines = lines
        self.environ = environ
        self.sources: dict[str, str] = {}
        self.secret_files: dict[str, str] = {}

    def file_origin(self, key: str) -> str:
        line = self.lines.get(key)
        return f"file {self.path}" + (f", line {line}" if line else "")

    def build(self) -> AgentConfig:
        values = self._section(AgentConfig, self.document, "")
        values["contexts"] = self._contexts()
        return AgentConfig(**values, sources=self.sources, path=self.path, secret_files=self.secret_files)

    def _section(self, cls: type, document: Any, prefix: str) -> dict[str, Any]:
        where = prefix.rstrip(".")
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError(where, self.file_origin(where), "expected a mapping of keys")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("sources", "path", "secret_files")}
        allowed = set(fields)
        for f in fields.values():
            if f.metadata.get("secret"):
                allowed.add(f.name + "_file")
        for name in document:
            if name not in allowed:
                key = f"{prefix}{name}"
                choices = ", ".join(sorted(n for n in allowed if not fields.get(n, f).metadata.get("secret")))
                raise ConfigError(str(key), self.file_origin(str(key)), f"unknown key; allowed here: {choices}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            key = f"{prefix}{name}"
            if "env" in f.metadata:
                values[name] = self._value(key, f, document)
            elif (section := _section_type(f)) is not None:
                values[name] = section(**self._section(section, document.get(name), key + "."))
        return values

    def _value(self, key: str, f: dataclasses.Field[Any], document: dict[str, Any]) -> Any:
        meta = f.metadata
        env_name: str = meta["env"]
        name = key.rsplit(".", 1)[-1]
        raw: Any
        if meta["secret"]:
            if name in document:
                raise ConfigError(key, self.file_origin(key),
                                  f"secrets are not read from the config file; set {env_name} in the environment "
                                  f"(e.g. systemd EnvironmentFile=) or point {name}_file / {env_name}_FILE at a file")
            # An empty NAME= (a template line left in an EnvironmentFile) must not hide NAME_FILE.
            if self.environ.get(env_name):
                origin, raw = "environment", self.environ[env_name]
            elif env_name + "_FILE" in self.environ:
                origin = "environment"
                path = self.environ[env_name + "_FILE"]
                raw = _read_secret_file(env_name + "_FILE", origin, path)
                self.secret_files[key] = path
            elif name + "_file" in document:
                origin = self.file_origin(f"{key}_file")
                path = s.text(document[name + "_file"])
                raw = _read_secret_file(f"{key}_file", origin, path)
                self.secret_files[key] = path
            elif env_name in self.environ:
                origin, raw = "environment", ""
            else:
                self.sources[key] = "default"
                return f.default
        elif env_name in self.environ:
            origin, raw = "environment", self.environ[env_name]
        elif name in document:
            origin, raw = self.file_origin(key), document[name]
        else:
            self.sources[key] = "default"
            return f.default
        try:
            value = meta["parse"](raw)
        except ValueError as e:
            shown = None if meta["secret"] else _shown(raw)
            raise ConfigError(_display_key(key, env_name, origin), origin, str(e), shown) from None
        self.sources[key] = "environment" if origin == "environment" else "file"
        return value

    def _contexts(self) -> dict[str, ContextConfig]:
        document = self.document.get("contexts")
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError("contexts", self.file_origin("contexts"),
                              "expected a mapping of context names to their settings")
        raw: dict[str, dict[str, tuple[Any, str]]] = {}
        for name, body in document.items():
            key = f"contexts.{name}"
            try:
                s.identifier(name)
            except ValueError as e:
                raise ConfigError(key, self.file_origin(key), f"bad context name: {e}") from None
            if body is None:
                body = {}
            if not isinstance(body, dict):
                raise ConfigError(key, self.file_origin(key), "expected a mapping of context settings")
            entries = raw.setdefault(str(name), {})
            for field_name, value in body.items():
                fkey = f"{key}.{field_name}"
                if field_name not in CONTEXT_FIELDS:
                    raise ConfigError(fkey, self.file_origin(fkey),
                                      "unknown key; allowed here: " + ", ".join(CONTEXT_FIELDS))
                entries[field_name] = (value, self.file_origin(fkey))
        for env_name, value in self.environ.items():
            parsed = _context_env(env_name)
            if parsed is None:
                continue
            env_context, field_name = parsed
            name = next((n for n in raw if env_token(n) == env_context), env_context.lower())
            raw.setdefault(name, {})[field_name] = (value, "environment")
        contexts: dict[str, ContextConfig] = {}
        for name, entries in raw.items():
            values: dict[str, Any] = {}
            for field_name, (value, origin) in entries.items():
                fkey = f"contexts.{name}.{field_name}"
                try:
                    values[field_name] = CONTEXT_FIELDS[field_name](value)
                except ValueError as e:
                    env_name = f"{CONTEXT_ENV_PREFIX}{env_token(name)}_{field_name.upper()}"
                    raise ConfigError(_display_key(fkey, env_name, origin), origin, str(e), _shown(value)) from None
                self.sources[fkey] = "environment" if origin == "environment" else "file"
            contexts[name] = ContextConfig(**values)
        if "default" not in contexts:
            contexts["default"] = ContextConfig()
        return contexts


def _read_secret_file(key: str, origin: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().strip()
    except OSError as e:
        raise ConfigError(key, origin, f"cannot read the secret file {path}: {e.strerror or e}") from None


def _shown(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    return yaml.safe_dump(raw, default_flow_style=True).strip().removesuffix("...").strip()


def _display_key(key: str, env_name: str, origin: str) -> str:
    return env_name if origin == "environment" else key


def _context_env(env_name: str) -> tuple[str, str] | None:
    """CONTEXT_<NAME>_<FIELD> -> (NAME, field); field names are matched from the end."""
    if not env_name.startswith(CONTEXT_ENV_PREFIX):
        return None
    rest = env_name[len(CONTEXT_ENV_PREFIX):]
    for field_name in CONTEXT_FIELDS:
        suffix = "_" + field_name.upper()
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], field_name
    return None


def _finish(config: AgentConfig, loader: _Loader, resolve_address: AddressResolver) -> AgentConfig:
    """Cross-field rules and derived values."""
    sources = loader.sources

    def origin_of(key: str) -> str:
        source = sources.get(key, "default")
        if source == "environment":
            return "environment"
        if source == "file":
            return loader.file_origin(key)
        return "default"

    def fail(key: str, problem: str) -> ConfigError:
        info = SETTINGS_BY_KEY[key]
        origin = origin_of(key)
        shown = None if info.secret else s.text(setting_value(config, key))
        return ConfigError(_display_key(key, info.env, origin), origin, problem, shown)

    if config.ari.password.strip().lower() == ARI_PASSWORD_PLACEHOLDER:
        raise _placeholder_password(config, origin_of("ari.password"))
    calls = config.calls
    if calls.default_context not in config.contexts:
        raise fail("calls.default_context",
                   "no such context; defined: " + ", ".join(sorted(config.contexts)))
    media = config.media
    web = config.web
    if media.transport == "audiosocket" and _same_listener(media.audiosocket_host, media.audiosocket_port,
                                                           web.host, web.port):
        raise fail("media.audiosocket_port", f"the web site already listens on {web.host}:{web.port}")
    if media.advertise_host in ("0.0.0.0", "::"):
        raise fail("media.advertise_host",
                   "Asterisk cannot send media to a wildcard address; give this machine's IP as Asterisk sees it")

    derived_media = media
    if not media.advertise_host:
        ari = urlsplit(config.ari.url)
        ari_host = ari.hostname or "127.0.0.1"
        try:
            address = resolve_address(ari_host, ari.port or (443 if ari.scheme == "https" else 80))
        except OSError as e:
            raise ConfigError(
                "RTP_ADVERTISE_HOST", "derived from ARI_URL",
                f"cannot find the local address that reaches {ari_host} ({e.strerror or e}); "
                "set RTP_ADVERTISE_HOST to this machine's IP as Asterisk sees it") from None
        derived_media = dataclasses.replace(media, advertise_host=s.ip_address(address))
        sources["media.advertise_host"] = "derived"
    store = config.store
    if not store.engine_id:
        # stable across restarts, so a restarted engine's old live records are recognisably its own
        store = dataclasses.replace(store, engine_id=f"{socket.gethostname()}-{config.ari.app}")
        sources["store.engine_id"] = "derived"
    return dataclasses.replace(config, media=derived_media, store=store, sources=dict(sources))


def _placeholder_password(config: AgentConfig, origin: str) -> ConfigError:
    """ARI_PASSWORD is the example files' placeholder: name where it was read, and what to do."""
    key = "ARI_PASSWORD" if origin == "environment" else "ari.password"
    secret_file = config.secret_files.get("ari.password")
    if secret_file is not None:
        origin = f"file {secret_file}"
    return ConfigError(
        key, origin,
        f"still the example placeholder {ARI_PASSWORD_PLACEHOLDER!r} of ai-agent.env.example and ari.conf: give the "
        f"[{config.ari.username}] user in ari.conf a password of your own (e.g. `openssl rand -base64 24`) and the "
        "agent the same one")


def _same_listener(host_a: str, port_a: int, host_b: str, port_b: int) -> bool:
    if port_a != port_b:
        return False
    wildcard = {"0.0.0.0", "::"}
    return host_a == host_b or host_a in wildcard or host_b in wildcard
