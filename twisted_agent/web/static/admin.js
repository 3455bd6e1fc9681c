// ai-agent admin UI: live updates over Server-Sent Events, and a confirmation before hanging up.
// Every value from the server goes into the page as text (textContent), never as markup.
"use strict";

(function () {
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function duration(seconds) {
    if (typeof seconds !== "number" || seconds < 0) return "-";
    var whole = Math.floor(seconds), h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), s = whole % 60;
    var ss = (s < 10 ? "0" : "") + s;
    if (h) return h + ":" + (m < 10 ? "0" : "") + m + ":" + ss;
    return m + ":" + ss;
  }

  function ms(value) {
    return typeof value === "number" ? Math.round(value) + " ms" : "-";
  }

  function status(text) {
    var node = document.getElementById("live-status");
    if (node) node.textContent = text;
  }

  // One EventSource; the browser reconnects on its own after a dropped connection. A refused one
  // (the session expired: 401) ends in CLOSED, and only a reload (and a login) helps.
  function listen(url, onData) {
    var source = new EventSource(url);
    source.onopen = function () { status(""); };
    source.onmessage = function (event) { onData(JSON.parse(event.data), source); };
    source.addEventListener("problem", function (event) {
      status("store unavailable: " + JSON.parse(event.data).error);
    });
    source.onerror = function () {
      status(source.readyState === EventSource.CLOSED ? "live updates stopped: reload the page" : "reconnecting...");
    };
    return source;
  }

  // --- the live calls table ----------------------------------------------------------------------

  var clockOffset = 0;  // server time minus browser time, seconds

  function tickDurations() {
    var now = Date.now() / 1000 + clockOffset;
    var cells = document.querySelectorAll(".duration[data-started]");
    for (var i = 0; i < cells.length; i++) {
      cells[i].textContent = duration(now - parseFloat(cells[i].getAttribute("data-started")));
    }
  }

  function liveRow(call) {
    var row = el("tr");
    var who = el("td");
    var link = el("a", "", call.caller_number || "(unknown)");
    link.href = call.href;
    who.appendChild(link);
    who.appendChild(el("span", "name", call.caller_name));
    row.appendChild(who);
    row.appendChild(el("td", "", call.engine_id));
    row.appendChild(el("td", "", call.provider));
    row.appendChild(el("td", "", call.context));
    var state = el("td");
    state.appendChild(el("span", "state " + call.state, call.state));
    row.appendChild(state);
    var since = el("td", "duration", "-");
    if (typeof call.started_at === "number") since.setAttribute("data-started", String(call.started_at));
    row.appendChild(since);
    row.appendChild(el("td", "num", ms(call.voice_to_voice_ms)));
    return row;
  }

  function startLiveTable(body) {
    listen(body.getAttribute("data-events"), function (data) {
      clockOffset = data.now - Date.now() / 1000;
      var rows = document.createDocumentFragment();
      data.calls.forEach(function (call) { rows.appendChild(liveRow(call)); });
      body.replaceChildren(rows);
      var count = document.getElementById("cluster-active");
      if (count) count.textContent = data.cluster_active === null ? "not known yet" : String(data.cluster_active);
      var empty = document.getElementById("no-calls");
      if (empty) empty.hidden = data.calls.length > 0;
      tickDurations();
    });
  }

  // --- one call: state, transcript, latency waterfall -------------------------------------------

  function drawWaterfall(box, data) {
    box.replaceChildren();
    if (!data.turns.length) {
      box.appendChild(el("p", "empty", "No turn measured yet."));
      return;
    }
    data.turns.forEach(function (turn, index) {
      var section = el("section", "turn");
      section.appendChild(el("h3", "", "Turn " + (index + 1)));
      if (turn.failed) {
        section.appendChild(el("p", "failed", "No answer: the caller heard the apology; " + turn.failed + "."));
      }
      var table = el("table", "stages");
      turn.bars.forEach(function (bar) {
        var row = el("tr");
        var label = el("th", "", bar.label);
        label.setAttribute("scope", "row");
        row.appendChild(label);
        var cell = el("td", "bar-cell");
        var svg = document.createElementNS(SVG, "svg");
        svg.setAttribute("viewBox", "0 0 100 1");
        svg.setAttribute("preserveAspectRatio", "none");
        svg.setAttribute("class", "track");
        var rect = document.createElementNS(SVG, "rect");
        rect.setAttribute("x", String(bar.left));
        rect.setAttribute("y", "0");
        rect.setAttribute("width", String(bar.width));
        rect.setAttribute("height", "1");
        rect.setAttribute("class", "bar " + bar.key);
        svg.appendChild(rect);
        cell.appendChild(svg);
        row.appendChild(cell);
        row.appendChild(el("td", "num", ms(bar.ms)));
        table.appendChild(row);
      });
      section.appendChild(table);
      if (turn.other.length) {
        section.appendChild(el("p", "other", turn.other.map(function (pair) {
          return pair[0] + ": " + ms(pair[1]);
        }).join(", ")));
      }
      box.appendChild(section);
    });
  }

  function startCall(body) {
    var transcript = document.getElementById("transcript");
    var waterfallBox = document.getElementById("waterfall");
    var stateNode = document.getElementById("call-state");
    listen(body.getAttribute("data-events"), function (data, source) {
      if (data.missing || data.ended) {
        // the finished call's page has its outcome, end reason and media statistics
        source.close();
        window.location.reload();
        return;
      }
      clockOffset = data.now - Date.now() / 1000;
      if (stateNode) {
        stateNode.textContent = data.state;
        stateNode.className = "state " + data.state;
      }
      // lines are only ever added: keep what is shown, append the new ones
      for (var i = transcript.children.length; i < data.transcript.length; i++) {
        var entry = data.transcript[i];
        var line = el("li", "line " + entry.speaker);
        line.appendChild(el("span", "speaker", entry.speaker));
        line.appendChild(el("span", "text", entry.text));
        transcript.appendChild(line);
      }
      if (waterfallBox) drawWaterfall(waterfallBox, data.waterfall);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var forms = document.querySelectorAll("form[data-confirm]");
    for (var i = 0; i < forms.length; i++) {
      forms[i].addEventListener("submit", function (event) {
        if (!window.confirm(event.currentTarget.getAttribute("data-confirm"))) event.preventDefault();
      });
    }
    setInterval(tickDurations, 1000);
    var live = document.getElementById("live-calls");
    if (live && window.EventSource) startLiveTable(live);
    var call = document.getElementById("call");
    if (call && call.getAttribute("data-live") === "1" && window.EventSource) startCall(call);
  });
})();
