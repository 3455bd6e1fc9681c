"""Showing the effective configuration: every setting, where it came from, secrets masked.

Used by ``ai-agent config`` (and the admin UI's configuration page).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted_agent.config import CONTEXT_ENV_PREFIX, CONTEXT_FIELDS, SETTINGS, AgentConfig, env_token, setting_value


def show(value: Any) -> str:
    """A setting's value as an operator would write it in the environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return str(value)


def mask(value: Any) -> str:
    """Show that a secret is set without showing it."""
    text = show(value)
    if not text:
        return ""
    return "****" + (text[-2:] if len(text) >= 12 else "")


def mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":****@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def describe(config: AgentConfig) -> list[tuple[str, str, str, str]]:
    """(key, environment variable, shown value, source) for every setting, secrets masked."""
    rows = []
    for info in SETTINGS:
        value = setting_value(config, info.key)
        if info.secret:
            shown = mask(value)
        elif info.key == "store.redis_url":
            shown = mask_url_password(value)
        else:
            shown = show(value)
        rows.append((info.key, info.env, shown, config.sources.get(info.key, "default")))
    for name, context in sorted(config.contexts.items()):
        for field_name in CONTEXT_FIELDS:
            key = f"contexts.{name}.{field_name}"
            env_name = f"{CONTEXT_ENV_PREFIX}{env_token(name)}_{field_name.upper()}"
            rows.append((key, env_name, show(getattr(context, field_name)), config.sources.get(key, "default")))
    return rows
