"""Value parsers for configuration settings.

Each parser takes the raw value (a YAML scalar or an environment string) and returns the typed
value, or raises ``ValueError`` whose text says what is allowed. The loader in
:mod:`twisted_agent.config` adds the key and where the value came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

Parser = Callable[[Any], Any]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def text(raw: Any) -> str:
    if isinstance(raw, (dict, list)):
        raise ValueError("expected a text value, not a list or mapping")
    if isinstance(raw, bool):
        # YAML reads unquoted yes/no/on/off/true/false as booleans: `language: no` must not become "False"
        raise ValueError("YAML read this as a boolean; put the text in quotes (e.g. 'no')")
    return "" if raw is None else str(raw)


def nonempty_text(raw: Any) -> str:
    value = text(raw).strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    value = text(raw).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected a boolean (true/false, yes/no, on/off, 1/0)")


def integer(minimum: int | None = None, maximum: int | None = None) -> Parser:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool):
            raise ValueError("expected an integer, not a boolean")
        try:
            value = int(text(raw).strip(), 10) if not isinstance(raw, int) else raw
        except ValueError:
            raise ValueError(f"expected an integer{_range(minimum, maximum)}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(f"expected an integer{_range(minimum, maximum)}")
        return value

    return parse


def number(minimum: float | None = None, maximum: float | None = None) -> Parser:
    def parse(raw: Any) -> float:
        if isinstance(raw, bool):
            raise ValueError("expected a number, not a boolean")
        try:
            value = float(raw) if isinstance(raw, (int, float)) else float(text(raw).strip())
        except ValueError:
            raise ValueError(f"expected a number{_range(minimum, maximum)}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number{_range(minimum, maximum)}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(f"expected a number{_range(minimum, maximum)}")
        return value

    return parse


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum:g} to {maximum:g}"
    if minimum is not None:
        return f" of at least {minimum:g}"
    if maximum is not None:
        return f" of at most {maximum:g}"
    return ""


port = integer(1, 65535)


def choice(*allowed: str) -> Parser:
    def parse(raw: Any) -> str:
        value = text(raw).strip().lower()
        if value not in allowed:
            raise ValueError("allowed: " + ", ".join(allowed))
        return value

    return parse


def optional_key(raw: Any) -> str:
    """A telephone key (0-9, * or #), or empty for none."""
    value = text(raw).strip()
    if value not in ("", *"0123456789*#"):
        raise ValueError("allowed: empty (no key), or one of 0-9, * and #")
    return value


def sound(*names: str) -> Parser:
    """One of the built-in sounds, or the absolute path of a 16-bit mono WAV file (checked now)."""
    def parse(raw: Any) -> str:
        value = text(raw).strip()
        if value in names:
            return value
        if not os.path.isabs(value):
            raise ValueError(f"allowed: {', '.join(names)}, or the absolute path of a 16-bit mono WAV file")
        from twisted_agent.media.wav import WavError, parse_wav

        try:
            with open(value, "rb") as stream:
                parse_wav(stream.read())
        except OSError as e:
            raise ValueError(f"cannot read {value}: {e.strerror or e}") from None
        except WavError as e:
            raise ValueError(f"{value} is not usable: {e}") from None
        return value
    return parse


def ip_address(raw: Any) -> str:
    """An IPv4 or IPv6 literal, normalised."""
    value = text(raw).strip()
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise ValueError("expected an IP address literal such as 0.0.0.0, 127.0.0.1 or ::") from None


def network_list(raw: Any) -> tuple[str, ...]:
    """Comma- or space-separated IP addresses or CIDR networks (a YAML list works too); empty = none."""
    items = raw if isinstance(raw, list) else re.split(r"[,\s]+", text(raw).strip())
    networks = []
    for item in items:
        item = text(item).strip()
        if not item:
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network; expected e.g. 10.0.0.5, 10.0.0.0/24") from None
    return tuple(networks)


def optional_ip_address(raw: Any) -> str:
    if not text(raw).strip():
        return ""
    return ip_address(raw)


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def host(raw: Any) -> str:
    """A listening address: an IP literal or a host name."""
    value = text(raw).strip()
    try:
        return ip_address(value)
    except ValueError:
        pass
    if _HOSTNAME.match(value):
        return value
    raise ValueError("expected an IP address (e.g. 127.0.0.1, 0.0.0.0, ::) or a host name")


def http_url(require_path_suffix: str = "") -> Parser:
    def parse(raw: Any) -> str:
        value = text(raw).strip().rstrip("/")
        parts = urlsplit(value)
        hint = f" ending in {require_path_suffix}" if require_path_suffix else ""
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL{hint}")
        try:
            parts.port  # noqa: B018 - validates the port number
        except ValueError:
            raise ValueError("the URL has an invalid port") from None
        if parts.query or parts.fragment:
            raise ValueError("the URL must not carry a query or fragment")
        if require_path_suffix and not parts.path.endswith(require_path_suffix):
            raise ValueError(f"expected an http:// or https:// URL{hint}, e.g. http://127.0.0.1:8088{require_path_suffix}")
        return value

    return parse


def websocket_url(raw: Any) -> str:
    value = text(raw).strip()
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("expected a wss:// (or ws://) URL")
    try:
        parts.port  # noqa: B018 - validates the port number
    except ValueError:
        raise ValueError("the URL has an invalid port") from None
    if parts.fragment:
        raise ValueError("the URL must not carry a fragment")
    return value


def ollama_host(raw: Any) -> str:
    """OLLAMA_HOST as the ollama client accepts it: a URL, or host[:port] (http://, port 11434 implied)."""
    value = text(raw).strip().rstrip("/")
    if not value:
        raise ValueError("must not be empty")
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected host[:port] or an http:// URL, e.g. http://127.0.0.1:11434")
    try:
        port_number = parts.port
    except ValueError:
        raise ValueError("the URL has an invalid port") from None
    if port_number is None:
        value = f"{parts.scheme}://{parts.netloc}:11434{parts.path}"
    return value


def redis_url(raw: Any) -> str:
    value = text(raw).strip()
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError("expected empty (in-memory store) or redis://[:password@]host[:port][/db]")
    try:
        parts.port  # noqa: B018
    except ValueError:
        raise ValueError("the URL has an invalid port") from None
    db = parts.path.lstrip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ValueError("the database number after the / must be an integer")
    return value


def absolute_path(raw: Any) -> str:
    value = text(raw).strip()
    if not value or not os.path.isabs(value):
        raise ValueError("expected an absolute path (Asterisk reads the files by absolute path)")
    return os.path.normpath(value)


PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def optional_certificates_file(raw: Any) -> str:
    """Empty, or a readable PEM file holding at least one certificate."""
    value = text(raw).strip()
    if not value:
        return ""
    try:
        with open(value, "rb") as stream:
            content = stream.read()
    except OSError as e:
        raise ValueError(f"expected empty or a readable PEM file ({e.strerror or e})") from None
    if PEM_CERTIFICATE not in content:
        raise ValueError("the file holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return os.path.abspath(value)


_APP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


def ari_app_name(raw: Any) -> str:
    value = text(raw).strip()
    if not _APP_NAME.match(value):
        raise ValueError("expected 1-80 characters of letters, digits, '-', '_' or '.' (the name used in Stasis())")
    return value


_IDENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def identifier(raw: Any) -> str:
    value = text(raw).strip()
    if not _IDENT.match(value):
        raise ValueError("expected a name of letters, digits, '_', '-' or '.'")
    return value


def log_level(raw: Any) -> str:
    return choice("debug", "info", "warn", "error", "critical")(raw)
