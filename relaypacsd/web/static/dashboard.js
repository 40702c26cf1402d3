/* The dashboard's pages: fetch JSON, update the DOM in place, every few seconds (no reload, no flashing).
   Every value goes in as text (textContent), never as HTML: a file name cannot inject markup. */
(function () {
  "use strict";
  var body = document.body;
  var page = body.dataset.page;
  var operator = body.dataset.role === "operator";
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var every = 1000 * (parseFloat(document.querySelector('meta[name="refresh-seconds"]').content) || 3);

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else if (k.slice(0, 5) === "data-") e.setAttribute(k, attrs[k]);
      else e[k] = attrs[k];
    });
    (children || []).forEach(function (c) { e.appendChild(c); });
    return e;
  }

  function age(s) {
    if (s === null || s === undefined) return "-";
    s = Math.floor(s);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
    return Math.floor(s / 86400) + "d" + String(Math.floor(s % 86400 / 3600)).padStart(2, "0") + "h";
  }

  function notice(text, bad) {
    var n = document.getElementById("notice");
    n.textContent = text;
    n.className = "notice" + (bad ? " bad" : "");
    n.hidden = !text;
  }

  function getJSON(url) {
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}}).then(function (r) {
      if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); }
      return r.json().then(function (b) { if (!r.ok) throw new Error(b.error || ("HTTP " + r.status)); return b; });
    });
  }

  function post(url, payload) {
    return fetch(url, {method: "POST", credentials: "same-origin",
                       headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
                       body: JSON.stringify(payload || {})}).then(function (r) {
      return r.json().then(function (b) { if (!r.ok) throw new Error(b.error || ("HTTP " + r.status)); return b; });
    });
  }

  function stamp() { document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString(); }

  function loop(load) {
    function tick() {
      if (document.hidden) { setTimeout(tick, every); return; }  // a hidden tab costs the daemon nothing
      load().then(stamp, function (e) { notice("cannot refresh: " + e.message, true); })
            .then(function () { setTimeout(tick, every); });
    }
    tick();
  }

  /* -- overview ------------------------------------------------------------------------------------------ */

  var span = "hour";

  function cell(field, text, cls) { return el("td", {"data-field": field, text: String(text), cls: cls || ""}); }

  function healthCell(p) {
    var word = p.health === "up" ? "up" : p.health === "DOWN" ? "DOWN" : "unknown";
    var td = el("td", {"data-field": "health"});
    td.appendChild(el("span", {cls: word === "up" ? "up" : word === "DOWN" ? "down" : "unknown", text: word}));
    if (p.paused) td.appendChild(el("span", {cls: "paused", "data-field": "paused",
                                             text: " · paused by " + (p.paused_by || "an operator")}));
    return td;
  }

  function pauseButton(p) {
    var td = el("td");
    if (!operator) return td;
    var b = el("button", {type: "button", text: p.paused ? "Resume" : "Pause", "data-action": p.paused ? "resume" : "pause"});
    b.addEventListener("click", function () {
      b.disabled = true;
      post("/api/pacs/" + encodeURIComponent(p.name) + "/" + (p.paused ? "resume" : "pause"))
        .then(function (r) { notice("PACS " + r.name + (r.paused ? " paused" : " resumed") + " by " + r.by); return loadOverview(); },
              function (e) { notice(e.message, true); });
    });
    td.appendChild(b);
    return td;
  }

  function loadOverview() {
    return Promise.all([getJSON("/api/status"), getJSON("/api/charts?span=" + span)]).then(function (res) {
      var st = res[0], ch = res[1], g = st.gateway || {};
      document.getElementById("g-state").textContent = !g.ready ? "starting" : g.alive ? "running" : "THREAD DOWN";
      document.getElementById("g-in-flight").textContent = g.in_flight;
      document.getElementById("g-sent").textContent = g.sent_this_run;
      document.getElementById("g-failed").textContent = g.failed_this_run;
      document.getElementById("g-uptime").textContent = age(g.uptime_seconds);
      document.getElementById("g-version").textContent = g.version;
      document.getElementById("roots").replaceChildren.apply(document.getElementById("roots"), st.watch.map(function (w) {
        return el("tr", {"data-root": w.root}, [cell("root", w.root), cell("inbox", w.inbox, "n"),
          cell("sending", w.sending, "n"), cell("sent", w.sent === null ? "counting…" : w.sent, "n"),
          cell("failed", w.failed, "n"), cell("oldest", age(w.oldest_waiting_seconds))]);
      }));
      var rows = st.pacs.map(function (p) {
        return el("tr", {"data-pacs": p.name}, [cell("name", p.name), healthCell(p),
          cell("last_success", p.last_success_age_seconds === null ? "never" : age(p.last_success_age_seconds) + " ago"),
          cell("waiting", p.waiting, "n"), cell("delivered", p.delivered, "n"), cell("failed", p.failed, "n"),
          cell("uid_conflicts", p.uid_conflicts, "n"), cell("last_error", p.last_error || ""), pauseButton(p)]);
      });
      if (!rows.length) rows = [el("tr", {}, [el("td", {colSpan: 9, text: "no active PACS", cls: "muted"})])];
      document.getElementById("pacs").replaceChildren.apply(document.getElementById("pacs"), rows);
      var nodes = (st.nodes || []).map(function (n) {
        var seen = Object.keys(n.pacs || {}).map(function (d) { return d + " " + (n.pacs[d].healthy ? "up" : "DOWN"); });
        return el("tr", {"data-node": n.name}, [cell("name", n.name), cell("host", n.host), cell("state", n.state),
          cell("heartbeat", age(n.heartbeat_age_seconds) + " ago"), cell("files", n.files, "n"),
          cell("pacs", seen.join(", "))]);
      });
      if (!nodes.length) nodes = [el("tr", {}, [el("td", {colSpan: 6, text: "no node has written a heartbeat yet", cls: "muted"})])];
      document.getElementById("nodes").replaceChildren.apply(document.getElementById("nodes"), nodes);
      MiniChart.line(document.getElementById("chart-delivered"), ch.times, ch.delivered);
      MiniChart.line(document.getElementById("chart-waiting"), ch.times, ch.waiting);
    });
  }

  function overview() {
    document.querySelectorAll(".switch button").forEach(function (b) {
      b.addEventListener("click", function () {
        span = b.dataset.span;
        document.querySelectorAll(".switch button").forEach(function (o) { o.classList.toggle("on", o === b); });
        document.getElementById("span-name").textContent = span;
        document.querySelectorAll(".per").forEach(function (p) { p.textContent = span === "hour" ? "minute" : "10 minutes"; });
        loadOverview();
      });
    });
    loop(loadOverview);
  }

  /* -- failed files ------------------------------------------------------------------------------------- */

  var selected = new Set();

  function fillSelect(id, values, first) {
    var s = document.getElementById(id), keep = s.value;
    var opts = [el("option", {value: "", text: first})].concat(values.map(function (v) { return el("option", {value: v, text: v}); }));
    if (s.options.length !== opts.length || Array.prototype.some.call(s.options, function (o, i) { return o.value !== opts[i].value; })) {
      s.replaceChildren.apply(s, opts);
      s.value = values.indexOf(keep) >= 0 ? keep : "";
    }
  }

  function retry(payload, what) {
    notice("retrying " + what + " …");
    return post("/api/failed/retry", payload).then(function (r) {
      r.queued.forEach(function (q) { selected.delete(q.id); });
      var text = r.queued.length + " file(s) back in sending/";
      if (r.errors.length) text += "; not retried: " + r.errors.map(function (e) { return e.error; }).join("; ");
      notice(text, r.errors.length > 0);
      return loadFailed();
    }, function (e) { notice(e.message, true); });
  }

  function loadFailed() {
    var q = new URLSearchParams({q: document.getElementById("q").value, stage: document.getElementById("stage").value,
                                 pacs: document.getElementById("pacs-filter").value});
    return getJSON("/api/failed?" + q).then(function (r) {
      fillSelect("stage", r.stages, "every stage");
      fillSelect("pacs-filter", r.pacs, "every PACS");
      document.getElementById("failed-count").textContent =
        r.matching === r.total ? "(" + r.total + ")" : "(" + r.matching + " of " + r.total + ")";
      var present = new Set(r.files.map(function (f) { return f.id; }));
      selected.forEach(function (id) { if (!present.has(id)) selected.delete(id); });
      var rows = r.files.map(function (f) {
        var tds = [];
        if (operator) {
          var box = el("input", {type: "checkbox", checked: selected.has(f.id)});
          box.addEventListener("change", function () { if (box.checked) selected.add(f.id); else selected.delete(f.id); buttons(); });
          tds.push(el("td", {}, [box]));
        }
        var name = el("td", {"data-field": "file"});  // its story across the PACS: the timeline
        name.appendChild(link(f.file, "/timeline?file=" + encodeURIComponent(f.file)));
        tds.push(name, cell("stage", f.stage), cell("reason", f.reason, "reason"), cell("code", f.code),
                 cell("next_step", f.next_step), cell("time", f.time.replace("T", " ").replace("+00:00", " UTC")));
        if (operator) {
          var b = el("button", {type: "button", text: "Retry", "data-action": "retry"});
          b.addEventListener("click", function () { b.disabled = true; retry({ids: [f.id]}, f.file); });
          tds.push(el("td", {}, [b]));
        }
        return el("tr", {"data-id": f.id}, tds);
      });
      if (!rows.length) rows = [el("tr", {}, [el("td", {colSpan: 8, cls: "muted",
        text: r.total ? "no failed file matches" : "no file in failed/"})])];
      document.getElementById("failed").replaceChildren.apply(document.getElementById("failed"), rows);
      buttons();
    });
  }

  function buttons() {
    var b = document.getElementById("retry-selected");
    if (b) { b.disabled = selected.size === 0; b.textContent = "Retry selected" + (selected.size ? " (" + selected.size + ")" : ""); }
  }

  function failed() {
    var timer = null;
    ["q", "stage", "pacs-filter"].forEach(function (id) {
      document.getElementById(id).addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(loadFailed, 200); });
    });
    if (operator) {
      document.getElementById("retry-selected").addEventListener("click", function () {
        retry({ids: Array.from(selected)}, selected.size + " file(s)");
      });
      document.getElementById("retry-all").addEventListener("click", function () {
        if (window.confirm("Put every failed file back into sending/?")) retry({all: true}, "every failed file");
      });
      document.getElementById("select-all").addEventListener("change", function (e) {
        document.querySelectorAll("#failed tr[data-id]").forEach(function (tr) {
          if (e.target.checked) selected.add(tr.dataset.id); else selected.delete(tr.dataset.id);
        });
        loadFailed();
      });
    }
    loop(loadFailed);
  }

  /* -- history and timelines -------------------------------------------------------------------------- */

  function when(t) { return t ? t.replace("T", " ").replace("+00:00", "") : ""; }

  function link(text, href) { var a = el("a", {text: text}); a.href = href; return a; }

  function history() {
    var form = document.getElementById("history-form");
    var params = new URLSearchParams(location.search);
    Array.prototype.forEach.call(form.elements, function (f) { if (f.name && params.get(f.name)) f.value = params.get(f.name); });

    function query() {
      var q = new URLSearchParams();
      Array.prototype.forEach.call(form.elements, function (f) { if (f.name && f.value) q.set(f.name, f.value); });
      return q;
    }

    function load() {
      var q = query();
      document.getElementById("csv").href = "/api/history?" + q + (String(q) ? "&" : "") + "format=csv";
      return getJSON("/api/history?" + q).then(function (r) {
        document.getElementById("history-count").textContent = "(" + r.records.length + (r.records.length >= 200 ? "+, newest first" : "") + ")";
        var rows = r.records.map(function (h) {
          var study = el("td", {"data-field": "study"});
          if (h.study_instance_uid) study.appendChild(link("timeline", "/timeline?study=" + encodeURIComponent(h.study_instance_uid)));
          var file = el("td", {"data-field": "file"});
          if (h.file) file.appendChild(link(h.file, "/timeline?file=" + encodeURIComponent(h.file)));
          return el("tr", {}, [cell("time", when(h.time)), cell("pacs", h.destination || "-"), cell("outcome", h.outcome),
            file, cell("modality", h.modality), cell("patient", h.patient_id), cell("accession", h.accession_number),
            cell("attempt", h.attempt || ""), cell("status", h.status_code === null ? "" : h.status_code),
            cell("ms", h.duration_ms === null ? "" : Math.round(h.duration_ms)), cell("user", h.user),
            cell("reason", h.reason, "reason"), study]);
        });
        if (!rows.length) rows = [el("tr", {}, [el("td", {colSpan: 13, cls: "muted", text: "no history record matches"})])];
        document.getElementById("history").replaceChildren.apply(document.getElementById("history"), rows);
      });
    }

    form.addEventListener("submit", function (e) {
      e.preventDefault();
      historyReplace(query());
      load().then(stamp, function (err) { notice(err.message, true); });
    });
    loop(load);
  }

  function historyReplace(q) { window.history.replaceState(null, "", "/history" + (String(q) ? "?" + q : "")); }

  function timeline() {
    var of = document.getElementById("timeline-of");
    var q = new URLSearchParams();
    q.set(of.dataset.kind, of.textContent);
    q.set("limit", "0");
    loop(function () {
      return getJSON("/api/history?" + q).then(function (r) {
        var events = r.records.slice().reverse();
        var last = {};
        events.forEach(function (h) { if (h.destination) last[h.sop_instance_uid + " " + h.destination] = h; });
        var per = {};
        Object.keys(last).forEach(function (k) {
          var h = last[k], p = per[h.destination] = per[h.destination] || {n: 0, outcomes: {}};
          p.n += 1; p.outcomes[h.outcome] = (p.outcomes[h.outcome] || 0) + 1;
        });
        var summary = Object.keys(per).sort().map(function (d) {
          var words = Object.keys(per[d].outcomes).sort().map(function (o) { return per[d].outcomes[o] + " " + o; });
          return el("tr", {"data-pacs": d}, [cell("pacs", d), cell("instances", per[d].n, "n"), cell("outcomes", words.join(", "))]);
        });
        if (!summary.length) summary = [el("tr", {}, [el("td", {colSpan: 3, cls: "muted", text: "no PACS has seen it"})])];
        document.getElementById("summary").replaceChildren.apply(document.getElementById("summary"), summary);
        var rows = events.map(function (h) {
          return el("tr", {}, [cell("time", when(h.time)), cell("pacs", h.destination || "-"), cell("outcome", h.outcome),
            cell("file", h.file), cell("sop", h.sop_instance_uid), cell("attempt", h.attempt || ""),
            cell("status", h.status_code === null ? "" : h.status_code),
            cell("ms", h.duration_ms === null ? "" : Math.round(h.duration_ms)), cell("user", h.user), cell("reason", h.reason, "reason")]);
        });
        if (!rows.length) rows = [el("tr", {}, [el("td", {colSpan: 10, cls: "muted", text: "no history record"})])];
        document.getElementById("timeline").replaceChildren.apply(document.getElementById("timeline"), rows);
      });
    });
  }

  if (page === "overview") overview();
  else if (page === "failed") failed();
  else if (page === "history") history();
  else if (page === "timeline") timeline();
})();
