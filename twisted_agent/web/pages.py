"""The admin UI's HTML, and the JSON its live updates carry: plain functions of records.

Markup is built with :mod:`twisted.web.template` tags, whose flattener escapes every string and
attribute, so a caller name like ``<script>`` shows as text. No inline script or style anywhere:
the Content-Security-Policy forbids both; bars are SVG rectangles sized by attributes.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from twisted.python.failure import Failure
from twisted.web.template import Flattenable, Tag, flatten, tags

PREFIX = "/admin"
#: a turn's stages in the order they happen; None: drawn from the start of the turn, not after the previous stage
STAGES: tuple[tuple[str, str, bool], ...] = (
    ("turn_end_wait_ms", "turn end wait", True),
    ("queue_ms", "queue", True),
    ("provider_stt_ms", "speech to text", True),
    ("provider_llm_first_token_ms", "LLM first token", True),
    ("provider_tts_first_sentence_ms", "TTS first sentence", True),
    ("voice_to_voice_ms", "voice to voice", False),
    ("failed_after_ms", "apology after", False),
)
#: why a turn got the apology instead of an answer (calls.timing.TURN_FAILURES), as the page says it
TURN_FAILURE_TEXTS = {"queue_timeout": "its work waited too long for the shared models (QUEUE_TIMEOUT)",
                      "provider_timeout": "the provider did not answer in time (PROVIDER_TIMEOUT)",
                      "provider_error": "the provider failed", "media_error": "the media leg failed"}
#: what a hang-up did, by the ``done`` query parameter of the call page it redirects to
HANGUP_RESULTS = {"ended": "call ended", "not-found": "call not found"}
LIVE_COLUMNS = ("Caller", "Engine", "Provider", "Context", "State", "Duration", "Voice to voice")
HISTORY_LIMIT_MAX = 1000


# --- small formatters ---------------------------------------------------------------------------


def call_href(call_id: str) -> str:
    return f"{PREFIX}/calls/{quote(call_id, safe='')}"


def fmt_time(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)) or epoch <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def fmt_ms(value: Any) -> str:
    return f"{value:.0f} ms" if isinstance(value, (int, float)) else "-"


def text(value: Any) -> str:
    return "" if value is None else str(value)


def last_voice_to_voice(record: Mapping[str, Any]) -> float | None:
    last = record.get("last_turn")
    value = last.get("voice_to_voice_ms") if isinstance(last, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


# --- the page frame -----------------------------------------------------------------------------


def to_html(root: Flattenable) -> bytes:
    """Flatten a tree of tags; nothing in it waits, so the flattener finishes at once."""
    out: list[bytes] = []
    failures: list[Failure] = []
    flatten(None, root, out.append).addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    return b"<!DOCTYPE html>\n" + b"".join(out)


@dataclass
class Chrome:
    """What every page around its content needs to know about the viewer."""

    #: the session's CSRF token: logged in (navigation and the logout form shown)
    csrf: str = ""
    flash: str = ""
    current: str = ""


NAV = (("live", "Live calls", f"{PREFIX}/"), ("history", "History", f"{PREFIX}/history"),
       ("config", "Configuration", f"{PREFIX}/config"))


def csrf_field(token: str) -> Tag:
    return tags.input(type="hidden", name="csrf", value=token)


def page(title: str, chrome: Chrome, *content: Flattenable, body_attrs: Mapping[str, str] | None = None) -> bytes:
    header = tags.header(tags.a("ai-agent", class_="brand", href=f"{PREFIX}/"))
    if chrome.csrf:
        links = [tags.a(label, href=href, **({"aria-current": "page"} if key == chrome.current else {}))
                 for key, label, href in NAV]
        logout = tags.form(csrf_field(chrome.csrf), tags.button("Log out", type="submit"),
                           method="post", action=f"{PREFIX}/logout", class_="logout")
        header(tags.nav(*links), logout)
    main = Tag("main")(tags.h1(title))
    if chrome.flash:
        main(tags.p(chrome.flash, class_="flash", role="status"))
    main(*content)
    body = tags.body(header, main, **(body_attrs or {}))
    return to_html(tags.html(
        tags.head(tags.meta(charset="utf-8"), tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
                  tags.title(f"{title} - ai-agent admin"),
                  tags.link(rel="stylesheet", href=f"{PREFIX}/static/admin.css"),
                  tags.script(src=f"{PREFIX}/static/admin.js", defer="defer")),
        body, lang="en"))


def message_page(title: str, message: str, chrome: Chrome | None = None, *more: Flattenable) -> bytes:
    return page(title, chrome or Chrome(), tags.p(message, class_="message"), *more)


def disabled_page(reason: str) -> bytes:
    return page("Admin UI disabled", Chrome(), tags.p(reason, class_="message"), tags.p(
        "To enable it, make a password hash with ", tags.code("ai-agent admin-password"),
        ", put the line it prints in the service's environment as ", tags.code("ADMIN_PASSWORD_HASH=..."),
        " (for example in the systemd EnvironmentFile) and restart the service."))


def login_page(csrf: str, next_path: str, message: str = "") -> bytes:
    form = tags.form(
        csrf_field(csrf), tags.input(type="hidden", name="next", value=next_path),
        tags.label("Password", tags.input(type="password", name="password", autocomplete="current-password",
                                          required="required", autofocus="autofocus")),
        tags.button("Log in", type="submit"), method="post", action=f"{PREFIX}/login", class_="login")
    return page("Log in", Chrome(), *([tags.p(message, class_="error", role="alert")] if message else []), form)


# --- live calls ---------------------------------------------------------------------------------


def live_payload(records: Sequence[Mapping[str, Any]], cluster_active: int | None) -> dict[str, Any]:
    """What /admin/events sends: the live table's rows (durations are counted in the browser)."""
    return {
        "cluster_active": cluster_active,
        "calls": [{
            "call_id": text(r.get("call_id")), "href": call_href(text(r.get("call_id"))),
            "caller_number": text(r.get("caller_number")), "caller_name": text(r.get("caller_name")),
            "engine_id": text(r.get("engine_id")), "provider": text(r.get("provider")),
            "context": text(r.get("context")), "state": text(r.get("state")),
            "started_at": r.get("started_at") if isinstance(r.get("started_at"), (int, float)) else None,
            "voice_to_voice_ms": last_voice_to_voice(r),
        } for r in records],
    }


def _cluster_text(cluster_active: int | None) -> str:
    return "not known yet" if cluster_active is None else str(cluster_active)


def live_page(payload: Mapping[str, Any], now: float, chrome: Chrome) -> bytes:
    rows = []
    for call in payload["calls"]:
        started = call["started_at"]
        rows.append(tags.tr(
            tags.td(tags.a(call["caller_number"] or "(unknown)", href=call["href"]),
                    tags.span(call["caller_name"], class_="name")),
            tags.td(call["engine_id"]), tags.td(call["provider"]), tags.td(call["context"]),
            tags.td(tags.span(call["state"], class_=f"state {call['state']}")),
            tags.td(fmt_duration(now - started if started is not None else None), class_="duration",
                    **({"data-started": repr(float(started))} if started is not None else {})),
            tags.td(fmt_ms(call["voice_to_voice_ms"]), class_="num")))
    table = tags.table(
        tags.thead(tags.tr(*[tags.th(c) for c in LIVE_COLUMNS])),
        tags.tbody(*rows, id="live-calls", **{"data-events": f"{PREFIX}/events"}), class_="calls")
    return page("Live calls", chrome,
                tags.p("Calls in progress on every engine sharing the store: ",
                       tags.strong(_cluster_text(payload["cluster_active"]), id="cluster-active"),
                       tags.span("", id="live-status", class_="live-status")),
                table, tags.p("No call in progress.", id="no-calls", class_="empty",
                              **({"hidden": "hidden"} if rows else {})))


# --- one call -----------------------------------------------------------------------------------


def waterfall(turns: Any) -> dict[str, Any]:
    """Per turn, a bar per latency stage it has, in percent of the slowest turn's end.

    The provider stages are drawn one after another from the end of the caller's speech (their
    real overlap is small); voice to voice spans the whole turn as the reference. A turn that got
    the apology instead of an answer says why (``failed``) and spans until then.
    """
    if not isinstance(turns, list):
        turns = []
    drawn: list[dict[str, Any]] = []
    scale = 1.0
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        offset = 0.0
        bars = []
        for key, label, sequential in STAGES:
            value = turn.get(key)
            if not isinstance(value, (int, float)) or value < 0:
                continue
            start = offset if sequential else 0.0
            bars.append({"key": key, "label": label, "ms": float(value), "start": start})
            scale = max(scale, start + value)
            if sequential:
                offset += value
        known = {key for key, _, _ in STAGES}
        other = [[k, float(v)] for k, v in sorted(turn.items())
                 if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool)]
        failed = turn.get("failed")
        why = TURN_FAILURE_TEXTS.get(failed, failed) if isinstance(failed, str) else ""
        drawn.append({"bars": bars, "other": other, "failed": why})
    for turn in drawn:
        for bar in turn["bars"]:
            bar["left"] = round(100 * bar.pop("start") / scale, 2)
            bar["width"] = round(max(100 * bar["ms"] / scale, 0.3), 2)
    return {"scale_ms": scale, "turns": drawn}


def call_payload(record: Mapping[str, Any]) -> dict[str, Any]:
    """What /admin/calls/<id>/events sends: the parts of the call page that change while it runs."""
    transcript = record.get("transcript")
    return {
        "call_id": text(record.get("call_id")),
        "state": text(record.get("state")),
        "ended": "ended_at" in record,
        "transcript": [{"speaker": text(t.get("speaker")), "text": text(t.get("text"))}
                       for t in (transcript if isinstance(transcript, list) else []) if isinstance(t, dict)],
        "waterfall": waterfall(record.get("turns")),
    }


def _waterfall_markup(data: Mapping[str, Any]) -> Tag:
    box = tags.div(id="waterfall", class_="waterfall")
    if not data["turns"]:
        return box(tags.p("No turn measured yet.", class_="empty"))
    for number, turn in enumerate(data["turns"], 1):
        rows = []
        for bar in turn["bars"]:
            svg = Tag("svg")(Tag("rect")(x=str(bar["left"]), y="0", width=str(bar["width"]), height="1",
                                         class_=f"bar {bar['key']}"),
                             viewBox="0 0 100 1", preserveAspectRatio="none", class_="track")
            rows.append(tags.tr(tags.th(bar["label"], scope="row"), tags.td(svg, class_="bar-cell"),
                                tags.td(fmt_ms(bar["ms"]), class_="num")))
        section = tags.section(tags.h3(f"Turn {number}"), class_="turn")
        if turn["failed"]:
            section(tags.p(f"No answer: the caller heard the apology; {turn['failed']}.", class_="failed"))
        section(tags.table(*rows, class_="stages"))
        if turn["other"]:
            section(tags.p(", ".join(f"{key}: {fmt_ms(ms)}" for key, ms in turn["other"]), class_="other"))
        box(section)
    return box


def _transcript_markup(entries: Sequence[Mapping[str, str]]) -> Tag:
    items = [tags.li(tags.span(e["speaker"], class_="speaker"), tags.span(e["text"], class_="text"),
                     class_=f"line {e['speaker']}") for e in entries]
    return tags.ol(*items, id="transcript", class_="transcript")


def _media_rows(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        rows: list[tuple[str, str]] = []
        for key, inner in sorted(value.items(), key=lambda kv: str(kv[0])):
            rows += _media_rows(inner, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
        return rows
    if isinstance(value, list):
        return [(prefix, ", ".join(text(v) for v in value))]
    return [(prefix, text(value))]


def _facts(pairs: Sequence[tuple[str, Flattenable]]) -> Tag:
    return tags.dl(*[part for label, value in pairs for part in (tags.dt(label), tags.dd(value))], class_="facts")


def call_page(record: Mapping[str, Any], now: float, chrome: Chrome) -> bytes:
    call_id = text(record.get("call_id"))
    payload = call_payload(record)
    ended = payload["ended"]
    started = record.get("started_at")

    def with_source(name: str) -> str:
        value, source = text(record.get(name)), text(record.get(f"{name}_source"))
        return f"{value} ({source})" if source else value

    facts: list[tuple[str, Flattenable]] = [
        ("Caller", f"{text(record.get('caller_number')) or '(unknown)'} {text(record.get('caller_name'))}".strip()),
        ("State", tags.span(payload["state"], id="call-state", class_=f"state {payload['state']}")),
        ("Provider", with_source("provider")), ("Context", with_source("context")),
        ("Engine", text(record.get("engine_id"))),
        ("Media", " / ".join(x for x in (text(record.get("transport")), text(record.get("downstream_mode"))) if x)),
        ("Started", fmt_time(started)),
    ]
    if ended:
        facts += [("Ended", fmt_time(record.get("ended_at"))), ("Duration", fmt_duration(record.get("duration_s"))),
                  ("Outcome", text(record.get("outcome"))), ("End reason", text(record.get("end_reason"))),
                  ("Hang-up cause", text(record.get("hangup_cause")) or "-")]
        for key, label in (("barge_ins", "Barge-ins"), ("fillers", "Fillers"), ("stream_fallback", "Stream fallback")):
            if record.get(key) not in (None, ""):
                facts.append((label, text(record.get(key))))
    elif isinstance(started, (int, float)):
        facts.append(("Duration", tags.span(fmt_duration(now - started), class_="duration",
                                            **{"data-started": repr(float(started))})))
    content: list[Flattenable] = [_facts(facts)]
    if not ended:
        content.append(tags.form(csrf_field(chrome.csrf), tags.button("Hang up", type="submit", class_="danger"),
                                 method="post", action=f"{call_href(call_id)}/hangup", class_="hangup",
                                 **{"data-confirm": "Hang up this call?"}))
    content += [tags.h2("Transcript"), _transcript_markup(payload["transcript"]),
                tags.h2("Latency per turn"), _waterfall_markup(payload["waterfall"])]
    media = _media_rows(record.get("media")) if record.get("media") else []
    if media:
        content += [tags.h2("Media statistics"),
                    tags.table(*[tags.tr(tags.th(k, scope="row"), tags.td(v)) for k, v in media], class_="media")]
    return page(f"Call {call_id}", chrome, *content, body_attrs={
        "id": "call", "data-live": "0" if ended else "1", "data-events": f"{call_href(call_id)}/events"})


# --- history ------------------------------------------------------------------------------------


@dataclass
class HistoryQuery:
    number: str = ""
    since: float | None = None
    until: float | None = None
    limit: int = 100
    #: the form's fields as typed, to show them again
    typed: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _day_start(value: str) -> float:
    return float(calendar.timegm(time.strptime(value, "%Y-%m-%d")))


def parse_history_query(args: Mapping[str, str]) -> HistoryQuery:
    """The history search form's fields; problems are listed (and the search not run), never raised."""
    query = HistoryQuery(typed={k: args.get(k, "") for k in ("number", "from", "to", "limit")})
    query.number = args.get("number", "").strip()[:64]
    for name in ("from", "to"):
        value = args.get(name, "").strip()
        if not value:
            continue
        try:
            start = _day_start(value)
        except ValueError:
            query.errors.append(f"{name}: {value!r} is not a date; use YYYY-MM-DD")
            continue
        if name == "from":
            query.since = start
        else:
            query.until = start + 86400 - 0.001  # the whole day is included
    if query.since is not None and query.until is not None and query.since > query.until:
        query.errors.append("from: the first day is after the last")
    limit = args.get("limit", "").strip()
    if limit:
        try:
            query.limit = int(limit)
        except ValueError:
            query.errors.append(f"limit: {limit!r} is not a whole number")
        else:
            if not 1 <= query.limit <= HISTORY_LIMIT_MAX:
                query.errors.append(f"limit: choose 1 to {HISTORY_LIMIT_MAX}")
    return query


def history_page(query: HistoryQuery, records: Sequence[Mapping[str, Any]] | None, chrome: Chrome,
                 problem: str = "") -> bytes:
    typed = query.typed
    form = tags.form(
        tags.label("Number contains", tags.input(type="search", name="number", value=typed.get("number", ""))),
        tags.label("From", tags.input(type="date", name="from", value=typed.get("from", ""))),
        tags.label("To", tags.input(type="date", name="to", value=typed.get("to", ""))),
        tags.label("Limit", tags.input(type="number", name="limit", min="1", max=str(HISTORY_LIMIT_MAX),
                                       value=typed.get("limit", "") or str(query.limit))),
        tags.button("Search", type="submit"), method="get", action=f"{PREFIX}/history", class_="search")
    content: list[Flattenable] = [form, tags.p("Dates are whole days in UTC, both included.", class_="hint")]
    content += [tags.p(error, class_="error", role="alert") for error in query.errors]
    if problem:
        content.append(tags.p(problem, class_="error", role="alert"))
    if records is not None:
        rows = [tags.tr(tags.td(tags.a(fmt_time(r.get("started_at")), href=call_href(text(r.get("call_id"))))),
                        tags.td(text(r.get("caller_number")), tags.span(text(r.get("caller_name")), class_="name")),
                        tags.td(fmt_duration(r.get("duration_s")), class_="num"), tags.td(text(r.get("outcome"))),
                        tags.td(text(r.get("end_reason"))), tags.td(text(r.get("provider"))),
                        tags.td(text(r.get("engine_id")))) for r in records]
        head = tags.tr(*[tags.th(c) for c in ("Started", "Caller", "Duration", "Outcome", "End reason", "Provider",
                                              "Engine")])
        content.append(tags.table(tags.thead(head), tags.tbody(*rows), class_="calls") if rows
                       else tags.p("No finished call matches.", class_="empty"))
    return page("History", chrome, *content)


# --- configuration ------------------------------------------------------------------------------


def config_page(rows: Sequence[tuple[str, str, str, str]], config_path: str | None, chrome: Chrome) -> bytes:
    table = tags.table(
        tags.thead(tags.tr(*[tags.th(c) for c in ("Setting", "Environment variable", "Value", "Source")])),
        tags.tbody(*[tags.tr(tags.td(tags.code(key)), tags.td(tags.code(env)), tags.td(value, class_="value"),
                             tags.td(source, class_=f"source {source}")) for key, env, value, source in rows]),
        class_="config")
    return page("Configuration", chrome,
                tags.p("Configuration file: ", tags.code(config_path or "none (defaults and environment)")),
                tags.p("Secrets are masked. ", tags.code("AI_PROVIDER"), " and ", tags.code("AI_CONTEXT"),
                       " are defaults: a call can override them with the channel variables of the same name "
                       "(set in the dialplan); each call's page shows which applied."),
                table)
