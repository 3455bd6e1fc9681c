"""What can go wrong talking to ARI, as exceptions the call engine can tell apart.

An HTTP error answer becomes the subclass for its status, carrying Asterisk's ``{"message": ...}``;
not getting an answer at all (refused, reset, DNS, TLS, timeout) is :class:`ARIUnavailable`.
"""

from __future__ import annotations

from twisted.internet import error as net_error
from twisted.python.failure import Failure

from twisted_agent.tls import tls_failure


class ARIError(Exception):
    """A failed ARI REST request. ``str()`` is one readable line."""

    def __init__(self, status: int | None, method: str, path: str, message: str, reason: str = "") -> None:
        super().__init__(status, method, path, message)
        #: the HTTP status, or None when no answer arrived
        self.status = status
        self.method = method
        #: the path below the ARI base URL, e.g. ``/channels/1234.5/answer``
        self.path = path
        #: Asterisk's ``message`` (or the HTTP reason phrase when the body has none)
        self.message = message
        #: the HTTP reason phrase, e.g. "Variable Not Found"
        self.reason = reason

    def __str__(self) -> str:
        if self.status is None:
            return f"ARI {self.method} {self.path}: {self.message}"
        return f"ARI {self.method} {self.path} failed: {self.status} {self.message}"


class ARIBadRequest(ARIError):
    """400: a missing or invalid parameter (also "channel not found" on bridge addChannel)."""


class ARIAuthError(ARIError):
    """401 or 403: wrong ARI_USERNAME/ARI_PASSWORD, a read-only user, or an ACL."""


class ARINotFound(ARIError):
    """404: the channel, bridge, playback or variable does not exist (during teardown: already gone)."""


class ARIConflict(ARIError):
    """409: the channel is not in Stasis, or the id already exists."""


class ARIPreconditionFailed(ARIError):
    """412: the channel is in an invalid state for this operation."""


class ARIUnprocessable(ARIError):
    """422: e.g. "Channel not in Stasis application" when adding to a bridge."""


class ARIServerError(ARIError):
    """5xx, or any other status the client did not expect."""


class ARIUnavailable(ARIError):
    """No answer: connection refused or reset, DNS, TLS, or the request timed out (``status`` is None)."""

    def __init__(self, method: str, path: str, message: str) -> None:
        super().__init__(None, method, path, message)


class ARIEventError(ValueError):
    """An events-WebSocket frame that is not a well-formed ARI event."""


_BY_STATUS: dict[int, type[ARIError]] = {
    400: ARIBadRequest,
    401: ARIAuthError,
    403: ARIAuthError,
    404: ARINotFound,
    409: ARIConflict,
    412: ARIPreconditionFailed,
    422: ARIUnprocessable,
}


def error_for_status(status: int, method: str, path: str, message: str, reason: str = "") -> ARIError:
    """The exception for an HTTP error status."""
    return _BY_STATUS.get(status, ARIServerError)(status, method, path, message, reason)


def wrapped_exceptions(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions inside twisted.web's wrappers (ResponseNeverReceived and co.)."""
    found = [e]
    for reason in getattr(e, "reasons", None) or ():
        if isinstance(reason, Failure) and isinstance(reason.value, BaseException):
            found.extend(wrapped_exceptions(reason.value))
    return found


def describe_unreachable(e: BaseException, where: str) -> str:
    """One line saying why ``where`` (host:port) gave no answer."""
    inner = wrapped_exceptions(e)
    if any(isinstance(x, net_error.ConnectionRefusedError) for x in inner):
        return f"connection refused by {where}"
    if any(isinstance(x, net_error.DNSLookupError) for x in inner):
        return f"cannot resolve the host name of {where}"
    if any(isinstance(x, net_error.TimeoutError | net_error.TCPTimedOutError) for x in inner):
        return f"connecting to {where} timed out"
    tls = [x for x in inner if type(x).__module__.startswith(("OpenSSL", "service_identity"))]
    if tls:
        return f"TLS with {where} failed ({tls_failure(tls[-1])}): check ARI_TLS_CA_FILE and the host name in ARI_URL"
    lost = [x for x in inner if isinstance(x, net_error.ConnectionLost | net_error.ConnectionDone)]
    if lost:
        return f"{where} closed the connection before answering ({summary(lost[-1])})"
    return f"cannot reach {where}: {summary(inner[-1])}"


def summary(e: BaseException) -> str:
    """``Type: text`` of an exception, on one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
