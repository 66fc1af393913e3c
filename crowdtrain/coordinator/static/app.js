/* crowdtrain dashboard logic: polls the coordinator's v1/status every 2 s and renders the
   KPIs, tables and hand-rolled SVG charts of index.html from that one JSON document.
   Plain browser JavaScript, no dependencies, nothing fetched from anywhere else. All text
   from the server goes through textContent (never innerHTML). */
"use strict";

(function () {
  const POLL_MS = 2000;
  const ACTIVE_S = 120;            // a volunteer seen this recently counts as online
  const TIMELINE_ROUNDS = 16;      // rounds on the timeline
  const MAX_ROWS = 50;             // rows of the volunteer tables (they scroll)
  const SVGNS = "http://www.w3.org/2000/svg";

  let last = null;                 // the last Status received
  let lastOkAt = null;             // browser time (ms) of the last good poll
  let skew = 0;                    // coordinator clock minus browser clock, seconds
  let offline = false;             // the last poll failed

  const $ = (id) => document.getElementById(id);
  const nowS = () => Date.now() / 1000 + skew;

  // ------------------------------------------------------------------ formatting

  const intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  function fmtInt(n) {
    return n == null || !isFinite(n) ? "–" : intFmt.format(Math.round(n));
  }

  function fmtBytes(n) {
    if (n == null || !isFinite(n)) return "–";
    const units = [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];
    for (const [u, s] of units) if (Math.abs(n) >= s) return (n / s).toFixed(1) + " " + u;
    return fmtInt(n) + " B";
  }

  function fmtBig(n) {
    if (n == null || !isFinite(n)) return "–";
    if (Math.abs(n) >= 1e10) return (n / 1e9).toFixed(1) + "B";
    if (Math.abs(n) >= 1e7) return (n / 1e6).toFixed(1) + "M";
    return fmtInt(n);
  }

  function median(xs) {
    if (!xs.length) return null;
    const a = xs.slice().sort((p, q) => p - q), m = a.length >> 1;
    return a.length % 2 ? a[m] : (a[m - 1] + a[m]) / 2;
  }

  function fmtLoss(x) {
    return x == null || !isFinite(x) ? "–" : x.toFixed(3);
  }

  function fmtRate(x) {
    if (x == null || !isFinite(x)) return "–";
    return x >= 100 ? fmtInt(x) : x.toFixed(1);
  }

  function fmtDur(s) {
    if (s == null || !isFinite(s)) return "–";
    s = Math.max(0, s);
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
  }

  function fmtAgo(t) {
    if (t == null) return "never";
    const s = Math.max(0, nowS() - t);
    if (s < 120) return Math.round(s) + "s ago";
    if (s < 7200) return Math.round(s / 60) + " min ago";
    if (s < 172800) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function fmtClock(t) {
    const d = new Date((t - skew) * 1000);
    return d.toLocaleTimeString("en-GB", { hour12: false });
  }

  function fmtAxis(v, step) {
    const a = Math.abs(v);
    if (a >= 1e9) return +(v / 1e9).toFixed(2) + "G";
    if (a >= 1e6) return +(v / 1e6).toFixed(2) + "M";
    if (step >= 1) return fmtInt(v);
    return v.toFixed(decimals(step));
  }

  function decimals(step) {
    return Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
  }

  // ------------------------------------------------------------------ derived figures

  function duration(r) {
    return r.closed_at != null ? r.closed_at - r.opened_at : null;
  }

  function tokensPerS(r) {
    const d = duration(r);
    return d != null && d > 0 ? r.tokens / d : null;
  }

  function isFinalRow(st, r) {
    // once finished, the coordinator has already opened (and evaluated) the round after the
    // last one; that row is the final model, not a round anyone trains
    return st.finished && r.round === st.round && r.state === "open";
  }

  function closedRounds(st) {
    return st.rounds.filter((r) => r.state === "closed" && r.closed_at != null);
  }

  function latestVal(st) {
    for (let i = st.rounds.length - 1; i >= 0; i--) {
      if (st.rounds[i].val_loss != null) return { round: st.rounds[i].round, loss: st.rounds[i].val_loss };
    }
    return st.initial_val_loss != null ? { round: 0, loss: st.initial_val_loss } : null;
  }

  function isActive(v) {
    return v.last_seen != null && nowS() - v.last_seen <= ACTIVE_S;
  }

  function openRound(st) {
    if (st.finished) return null;
    return st.rounds.find((r) => r.round === st.round && r.state === "open") || null;
  }

  // ------------------------------------------------------------------ DOM helpers

  function h(tag, props, children) {
    const e = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v == null) continue;
        if (k === "text") e.textContent = v;
        else if (k === "class") e.className = v;
        else e.setAttribute(k, v);
      }
    }
    for (const c of children || []) if (c != null) e.append(c);
    return e;
  }

  function s(tag, attrs, parent, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v != null) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }

  function tip(parent, text) {
    s("title", {}, parent, text);
    return parent;
  }

  function setText(id, text) {
    const e = $(id);
    if (e && e.textContent !== text) e.textContent = text;
  }

  function setEmpty(tableId, emptyId, rows, emptyNodes) {
    const table = $(tableId), empty = $(emptyId);
    table.querySelector("tbody").replaceChildren(...rows);
    table.hidden = rows.length === 0;
    empty.hidden = rows.length !== 0;
    if (rows.length === 0) empty.replaceChildren(...emptyNodes);
  }

  // ------------------------------------------------------------------ chart helpers

  function niceStep(span, count) {
    if (!(span > 0)) return 1;
    const raw = span / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const n = raw / mag;
    return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
  }

  function niceDomain(lo, hi, count) {
    if (hi - lo < 1e-9) { const pad = Math.max(Math.abs(hi) * 0.05, 0.05); lo -= pad; hi += pad; }
    const step = niceStep(hi - lo, count);
    return { lo: Math.floor(lo / step + 1e-9) * step, hi: Math.ceil(hi / step - 1e-9) * step, step };
  }

  function range(lo, hi, step) {
    const out = [];
    for (let i = 0, v = lo; v <= hi + step * 1e-6 && i < 1000; i++, v = lo + i * step) out.push(v);
    return out;
  }

  function frame(container, height, m) {
    const width = Math.max(260, Math.floor(container.clientWidth || 560));
    const root = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height,
                            preserveAspectRatio: "xMidYMid meet", role: "img" });
    container.replaceChildren(root);
    return { root, width, height, left: m.l, right: width - m.r, top: m.t, bottom: height - m.b };
  }

  function emptyChart(container, height, message) {
    const f = frame(container, height, { l: 0, r: 0, t: 0, b: 0 });
    s("rect", { x: 0.5, y: 0.5, width: f.width - 1, height: height - 1, rx: 8, fill: "none",
                stroke: "#e2e6eb", "stroke-dasharray": "4 4" }, f.root);
    s("text", { x: f.width / 2, y: height / 2 + 4, "text-anchor": "middle", class: "empty-text" },
      f.root, message);
  }

  function yAxis(f, dom, fmt) {
    const g = s("g", {}, f.root);
    const y = (v) => f.bottom - ((v - dom.lo) / (dom.hi - dom.lo)) * (f.bottom - f.top);
    for (const v of range(dom.lo, dom.hi, dom.step)) {
      const yy = Math.round(y(v)) + 0.5;
      s("line", { x1: f.left, x2: f.right, y1: yy, y2: yy, class: "gridline" }, g);
      s("text", { x: f.left - 8, y: yy + 4, "text-anchor": "end" }, g, fmt(v));
    }
    s("line", { x1: f.left, x2: f.right, y1: f.bottom + 0.5, y2: f.bottom + 0.5, class: "axis" }, g);
    return y;
  }

  function legend(f, items) {
    // items: [{label, kind: "line"|"bar", cls, dash}], drawn right-aligned above the plot
    const g = s("g", { class: "legend" }, f.root);
    let x = f.right;
    for (const it of items.slice().reverse()) {
      const t = s("text", { x, y: 12, "text-anchor": "end" }, g, it.label);
      const w = t.getComputedTextLength ? t.getComputedTextLength() : it.label.length * 6.5;
      x -= w + 8;
      if (it.kind === "bar") {
        s("rect", { x: x - 11, y: 3, width: 11, height: 11, rx: 2, class: it.cls }, g);
        x -= 11;
      } else {
        s("line", { x1: x - 24, x2: x, y1: 8, y2: 8, class: it.line }, g);
        s("circle", { cx: x - 12, cy: 8, r: 3.5, class: it.swatch }, g);
        x -= 24;
      }
      x -= 18;
    }
  }

  // ------------------------------------------------------------------ loss chart

  function renderLoss(st) {
    const box = $("loss-chart");
    const val = [], train = [];
    if (st.initial_val_loss != null) val.push([0, st.initial_val_loss]);
    for (const r of st.rounds) {
      if (r.val_loss != null && !(r.round === 0 && st.initial_val_loss != null)) val.push([r.round, r.val_loss]);
      if (r.train_loss != null) train.push([r.round, r.train_loss]);
    }
    if (!val.length && !train.length) {
      emptyChart(box, 280, "The loss curve starts once the first model has been evaluated.");
      return;
    }
    const f = frame(box, 280, { l: 52, r: 18, t: 30, b: 38 });
    const all = val.concat(train);
    const ys = all.map((p) => p[1]);
    const dom = niceDomain(Math.min(...ys), Math.max(...ys), 5);
    const y = yAxis(f, dom, (v) => v.toFixed(decimals(dom.step)));
    const xmax = Math.max(1, ...all.map((p) => p[0]));
    const x = (v) => f.left + 10 + (v / xmax) * (f.right - f.left - 20);
    const xstep = Math.max(1, Math.round(niceStep(xmax, Math.max(2, Math.floor((f.right - f.left) / 60)))));
    const gx = s("g", {}, f.root);
    for (let v = 0; v <= xmax; v += xstep) {
      s("line", { x1: x(v), x2: x(v), y1: f.bottom, y2: f.bottom + 5, class: "axis" }, gx);
      s("text", { x: x(v), y: f.bottom + 18, "text-anchor": "middle" }, gx, String(v));
    }
    s("text", { x: f.right, y: f.height - 3, "text-anchor": "end", class: "axis-title" }, gx, "round");
    s("text", { x: 12, y: f.top + (f.bottom - f.top) / 2, class: "axis-title", "text-anchor": "middle",
                transform: `rotate(-90 12 ${f.top + (f.bottom - f.top) / 2})` }, gx, "loss (nats/token)");

    const path = (pts) => pts.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
    if (val.length > 1) {
      s("path", { d: path(val) + ` L${x(val[val.length - 1][0]).toFixed(1)} ${f.bottom} L${x(val[0][0]).toFixed(1)} ${f.bottom} Z`,
                  class: "val-area" }, f.root);
    }
    if (train.length > 1) s("path", { d: path(train), class: "train-line" }, f.root);
    if (val.length > 1) s("path", { d: path(val), class: "val-line" }, f.root);
    const r = Math.max(2.2, Math.min(4, (f.right - f.left) / Math.max(val.length, train.length) / 5));
    for (const [rx, ry] of train) {
      tip(s("circle", { cx: x(rx), cy: y(ry), r, class: "train-point" }, f.root),
          `round ${rx}: workers' mean training loss ${fmtLoss(ry)}`);
    }
    for (const [rx, ry] of val) {
      tip(s("circle", { cx: x(rx), cy: y(ry), r: r + 0.5, class: "val-point" }, f.root),
          `model after ${rx} round${rx === 1 ? "" : "s"}: held-out loss ${fmtLoss(ry)}`);
    }
    if (val.length) {
      const [lx, ly] = val[val.length - 1];
      const right = x(lx) > f.right - 60;
      s("text", { x: x(lx) + (right ? -8 : 8), y: y(ly) - 9, "text-anchor": right ? "end" : "start",
                  class: "last-value" }, f.root, fmtLoss(ly));
    }
    legend(f, [
      { label: "held-out (validation) loss", line: "val-line", swatch: "val-swatch" },
      { label: "workers' training loss", line: "train-line", swatch: "train-swatch" },
    ]);
  }

  // ------------------------------------------------------------------ bar charts

  function barChart(box, rows, series, fmtY, emptyMsg) {
    const height = 210;
    if (!rows.length) { emptyChart(box, height, emptyMsg); return; }
    const f0 = Math.max(260, Math.floor(box.clientWidth || 400));
    const maxBars = Math.max(4, Math.floor((f0 - 70) / (series.length * 9 + 6)));
    rows = rows.slice(-maxBars);
    const f = frame(box, height, { l: 52, r: 8, t: series.length > 1 ? 28 : 12, b: 32 });
    let top = 0;
    for (const r of rows) for (const se of series) top = Math.max(top, se.value(r) || 0);
    const dom = niceDomain(0, top > 0 ? top : 1, 4);
    dom.lo = 0;
    const y = yAxis(f, dom, (v) => fmtY(v, dom.step));
    const slot = (f.right - f.left) / rows.length;
    const bw = Math.max(2, Math.min(22, (slot * 0.72) / series.length));
    const labelEvery = Math.max(1, Math.ceil(26 / slot));
    rows.forEach((r, i) => {
      const cx = f.left + slot * (i + 0.5);
      series.forEach((se, j) => {
        const v = se.value(r) || 0;
        const bx = cx - (bw * series.length) / 2 + j * bw;
        const by = y(v);
        tip(s("rect", { x: bx + 0.5, y: by, width: Math.max(1, bw - 1), height: Math.max(0, f.bottom - by),
                        rx: Math.min(2, bw / 4), class: se.cls }, f.root),
            `round ${r.round}: ${se.name} ${se.fmt(v)}`);
      });
      if ((rows.length - 1 - i) % labelEvery === 0) {  // counted back from the newest round
        s("text", { x: cx, y: f.bottom + 16, "text-anchor": "middle" }, f.root, String(r.round));
      }
    });
    s("text", { x: f.right, y: f.height - 2, "text-anchor": "end", class: "axis-title" }, f.root, "round");
    if (series.length > 1) legend(f, series.map((se) => ({ label: se.name, kind: "bar", cls: se.cls })));
  }

  function bytesAxis(v, step) {
    if (v === 0) return "0";
    for (const [u, sc] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
      if (step >= sc / 100 || Math.abs(v) >= sc) return +(v / sc).toFixed(Math.max(0, decimals(step / sc))) + " " + u;
    }
    return v + " B";
  }

  function renderBars(st) {
    const rows = st.rounds.filter((r) => !isFinalRow(st, r) && (r.bytes_in || r.bytes_out || r.state === "closed"));
    barChart($("bytes-chart"), rows, [
      { name: "in (uploads)", cls: "bar-in", value: (r) => r.bytes_in, fmt: fmtBytes },
      { name: "out (downloads)", cls: "bar-out", value: (r) => r.bytes_out, fmt: fmtBytes },
    ], bytesAxis, "No traffic yet.");
    barChart($("tps-chart"), closedRounds(st), [
      { name: "tokens/s", cls: "bar-tps", value: tokensPerS, fmt: (v) => fmtRate(v) + " tokens/s" },
    ], fmtAxis, "Appears when the first round closes.");
  }

  // ------------------------------------------------------------------ timeline

  function timeTicks(t0, t1, px) {
    const span = Math.max(1, t1 - t0);
    const want = Math.max(2, Math.floor(px / 90));
    const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];
    const step = steps.find((x) => span / x <= want) || 86400 * Math.ceil(span / want / 86400);
    const out = [];
    for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) out.push(t);
    return out;
  }

  function renderTimeline(st) {
    const box = $("timeline");
    const rounds = st.rounds.filter((r) => !isFinalRow(st, r));
    const shown = rounds.slice(-TIMELINE_ROUNDS);
    setText("timeline-hint", shown.length
      ? (shown.length < rounds.length ? `last ${shown.length} of ${rounds.length} rounds` : "all rounds")
        + " · red marks: refused contributions"
      : "");
    if (!shown.length) { emptyChart(box, 96, "No rounds yet."); return; }
    const now = nowS();
    const t0 = shown[0].opened_at;
    const ends = shown.map((r) => (r.closed_at != null ? r.closed_at : now));
    const t1 = Math.max(t0 + 1, ...ends);
    const f = frame(box, 96, { l: 8, r: 8, t: 18, b: 28 });
    const x = (t) => f.left + ((t - t0) / (t1 - t0)) * (f.right - f.left);
    const barTop = f.top + 8, barH = 30;
    for (const r of shown) {
      const a = x(r.opened_at), b = x(r.closed_at != null ? r.closed_at : now);
      const open = r.state === "open";
      const w = Math.max(1.5, b - a - 1.5);
      const d = (r.closed_at != null ? r.closed_at : now) - r.opened_at;
      tip(s("rect", { x: a, y: barTop, width: w, height: barH, rx: 4,
                      class: open ? "seg-open" : "seg-closed" }, f.root),
          `round ${r.round} · ${open ? "open for " : "took "}${fmtDur(d)} · ${fmtInt(r.contributions)} contributions`
          + ` · ${fmtInt(r.tokens)} tokens` + (r.refused ? ` · ${r.refused} refused` : ""));
      if (w > 26) {
        s("text", { x: a + w / 2, y: barTop + barH / 2 + 4, "text-anchor": "middle",
                    class: "seg-label" + (open ? " seg-open-label" : "") }, f.root, String(r.round));
      }
    }
    for (const rf of st.refusals) {
      if (rf.at < t0 || rf.at > t1 + 1) continue;
      const cx = x(Math.min(rf.at, t1));
      tip(s("path", { d: `M${cx - 5} ${barTop - 10} L${cx + 5} ${barTop - 10} L${cx} ${barTop - 2} Z`,
                      class: "refusal-mark" }, f.root),
          `refused in round ${rf.round} from ${rf.volunteer}: ${rf.reason}`);
    }
    if (!st.finished) {
      s("line", { x1: x(now), x2: x(now), y1: barTop - 4, y2: barTop + barH + 4, class: "now-line" }, f.root);
    }
    s("line", { x1: f.left, x2: f.right, y1: f.bottom + 0.5, y2: f.bottom + 0.5, class: "axis" }, f.root);
    for (const t of timeTicks(t0, t1, f.right - f.left)) {
      const xx = x(t);
      s("line", { x1: xx, x2: xx, y1: f.bottom, y2: f.bottom + 4, class: "axis" }, f.root);
      s("text", { x: xx, y: f.bottom + 17, "text-anchor": xx < f.left + 30 ? "start" : xx > f.right - 30 ? "end" : "middle" },
        f.root, fmtClock(t));
    }
  }

  function renderTimelineStats(st) {
    const closed = st.rounds.filter((r) => !isFinalRow(st, r)).slice(-TIMELINE_ROUNDS)
      .filter((r) => r.state === "closed" && r.closed_at != null);
    const stat = (label, value) => h("div", { class: "stat" }, [
      h("div", { class: "stat-label", text: label }), h("div", { class: "stat-value", text: value })]);
    const box = $("timeline-stats");
    if (!closed.length) { box.replaceChildren(); return; }
    const slow = closed.reduce((a, r) => (duration(r) > duration(a) ? r : a));
    box.replaceChildren(
      stat("median round", fmtDur(median(closed.map(duration)))),
      stat("slowest round", `${fmtDur(duration(slow))} (round ${slow.round})`),
      stat("contributions per round", fmtRate(closed.reduce((a, r) => a + r.contributions, 0) / closed.length)),
      stat("refused contributions", fmtInt(closed.reduce((a, r) => a + r.refused, 0))),
    );
  }

  // the round counter, countdown and progress bar: re-rendered every second
  function renderClock() {
    const st = last;
    if (!st) return;
    const wrap = $("round-progress");
    const open = openRound(st);
    let leftText, rightText, frac, done = false;
    if (st.finished) {
      const closed = closedRounds(st);
      const total = closed.length ? closed[closed.length - 1].closed_at - st.rounds[0].opened_at : 0;
      leftText = `Run finished after ${st.round} round${st.round === 1 ? "" : "s"}`;
      rightText = closed.length ? `${fmtDur(total)} in all` : "";
      frac = 1; done = true;
      setText("round-sub", closed.length ? `all rounds closed in ${fmtDur(total)}` : "run finished");
    } else if (open) {
      const now = nowS();
      const elapsed = now - open.opened_at;
      const left = st.round_deadline != null ? st.round_deadline - now : null;
      leftText = `Round ${open.round} open for ${fmtDur(elapsed)}`;
      rightText = left == null ? "" : left > 0 ? `closes within ${fmtDur(left)}` : "deadline passed, waiting for contributions";
      frac = left == null ? 0 : elapsed / Math.max(1e-6, elapsed + Math.max(0, left));
      setText("round-sub", left == null ? "open" : left > 0 ? `open · ≤ ${fmtDur(left)} left` : "open · waiting for work");
      if (st.round_waiting) {  // short of contributions: say why and what happens next
        rightText = `waiting: ${st.round_waiting}` + (left != null && left > 0 ? ` · next check in ${fmtDur(left)}` : "");
      }
      if (st.close_failing) {  // the close fails and is retried: say why
        rightText = `closing the round fails (retrying): ${st.close_failing}`;
      }
    } else {
      leftText = "Waiting for the first round to open"; rightText = ""; frac = 0;
      setText("round-sub", "not started");
    }
    let line = wrap.querySelector(".progress-line");
    if (!line) {
      line = h("div", { class: "progress-line" }, [h("span", { class: "left" }), h("span", { class: "right" })]);
      wrap.replaceChildren(line, h("div", { class: "progress" }, [h("span")]));
    }
    line.querySelector(".left").textContent = leftText;
    line.querySelector(".right").textContent = rightText;
    const bar = wrap.querySelector(".progress");
    bar.classList.toggle("done", done);
    bar.firstChild.style.width = (Math.max(0, Math.min(1, frac)) * 100).toFixed(1) + "%";
    for (const tr of $("volunteers").querySelectorAll("tbody tr")) {
      const cell = tr.querySelector("[data-seen]");
      if (cell) cell.textContent = fmtAgo(+cell.dataset.seen);
    }
    if (lastOkAt != null) setText("updated", fmtAgo(lastOkAt / 1000 + skew));
  }

  // ------------------------------------------------------------------ cards

  function renderHeader(st) {
    setText("run-name", st.run_name);
    document.title = `${st.run_name} · ${st.finished ? "finished" : "round " + st.round} · crowdtrain`;
    const pill = $("state-pill");
    pill.className = "pill " + (offline ? "pill-wait" : st.finished ? "pill-done" : "pill-live");
    pill.textContent = offline ? "offline" : st.finished ? "finished" : "training";
    const perParam = st.params ? st.payload_bytes / st.params : 0;
    const meta = $("run-meta");
    const item = (b, rest) => h("span", {}, [h("b", { text: b }), " " + rest]);
    meta.replaceChildren(
      item(fmtInt(st.params), "parameters"),
      item(fmtBytes(st.payload_bytes), `per upload (${perParam.toFixed(2)} bytes/param)`),
      item(fmtBytes(st.full_model_bytes), "full model"),
      item("API v" + st.api_version, ""),
    );
  }

  function renderKpis(st) {
    setText("round", st.finished ? `${st.round} · finished` : String(st.round));
    const v = latestVal(st);
    setText("kpi-loss", v ? fmtLoss(v.loss) : "–");
    const sub = $("kpi-loss-sub");
    if (v && st.initial_val_loss != null && v.round > 0) {
      const pct = ((v.loss - st.initial_val_loss) / st.initial_val_loss) * 100;
      sub.replaceChildren(`from ${fmtLoss(st.initial_val_loss)} `,
        h("span", { class: pct <= 0 ? "good" : "bad", text: `(${pct <= 0 ? "−" : "+"}${Math.abs(pct).toFixed(1)}%)` }));
    } else {
      sub.textContent = v ? "initial model" : "not evaluated yet";
    }
    const closed = closedRounds(st);
    const lc = closed.length ? closed[closed.length - 1] : null;
    const tps = lc ? tokensPerS(lc) : null;
    $("kpi-tps").replaceChildren(fmtRate(tps), tps == null ? "" : h("small", { text: "tok/s" }));
    setText("kpi-tps-sub", lc ? `round ${lc.round} took ${fmtDur(duration(lc))}` : "no round closed yet");
    const tokens = st.volunteers.reduce((a, x) => a + x.tokens, 0);
    const acc = st.volunteers.reduce((a, x) => a + x.accepted, 0);
    const ref = st.volunteers.reduce((a, x) => a + x.refused, 0);
    setText("kpi-tokens", fmtBig(tokens));
    $("kpi-tokens").title = fmtInt(tokens) + " tokens";
    setText("kpi-tokens-sub", `${fmtInt(acc)} accepted · ${fmtInt(ref)} refused`);
    const active = st.volunteers.filter(isActive).length;
    setText("kpi-active", fmtInt(active));
    setText("kpi-active-sub", `of ${fmtInt(st.volunteers.length)} joined`);
    const bin = st.rounds.reduce((a, r) => a + r.bytes_in, 0);
    const bout = st.rounds.reduce((a, r) => a + r.bytes_out, 0);
    $("kpi-bytes").replaceChildren(fmtBytes(bin), h("small", { text: "in" }));
    setText("kpi-bytes-sub", `${fmtBytes(bout)} out`);
  }

  function moreRow(cols, n, what) {
    return h("tr", {}, [h("td", { class: "muted", colspan: String(cols), text: `and ${fmtInt(n)} more ${what}` })]);
  }

  function renderLeaderboard(st) {
    const ranked = st.volunteers.slice().sort((a, b) => b.tokens - a.tokens || a.name.localeCompare(b.name));
    const top = ranked.length ? Math.max(1, ranked[0].tokens) : 1;
    const rows = ranked.slice(0, MAX_ROWS).map((v, i) => h("tr", {}, [
      h("td", { class: `num rank rank-${i + 1}`, text: String(i + 1) }),
      h("td", { class: "name", title: v.name }, [
        v.name,
        h("div", { class: "share" }, [h("span", { style: `width:${((v.tokens / top) * 100).toFixed(1)}%` })]),
      ]),
      h("td", { class: "num", text: fmtInt(v.tokens) }),
      h("td", { class: "num", text: fmtInt(v.accepted) }),
      h("td", { class: "num" + (v.refused ? " bad-num" : " muted"), text: fmtInt(v.refused) }),
    ]));
    if (ranked.length > rows.length) rows.push(moreRow(5, ranked.length - rows.length, "volunteers"));
    setEmpty("leaderboard", "leaderboard-empty", rows, [
      "Nobody has contributed yet. Lend a machine with ",
      h("code", { text: `crowdtrain join ${location.origin}` }),
    ]);
  }

  function renderVolunteers(st) {
    const act = st.volunteers.filter(isActive)
      .sort((a, b) => (b.tokens_per_s || 0) - (a.tokens_per_s || 0) || a.name.localeCompare(b.name));
    const rows = act.slice(0, MAX_ROWS).map((v) => h("tr", {}, [
      h("td", { class: "name", title: v.name }, [h("span", { class: "dot" }), v.name]),
      h("td", { text: v.device || "–" }),
      h("td", { class: "num", text: fmtRate(v.tokens_per_s) }),
      h("td", { class: "num", text: fmtInt(v.rounds) }),
      h("td", { class: "num", "data-seen": String(v.last_seen), text: fmtAgo(v.last_seen) }),
    ]));
    if (act.length > rows.length) rows.push(moreRow(5, act.length - rows.length, "online"));
    const idle = st.volunteers.length - act.length;
    setEmpty("volunteers", "volunteers-empty", rows, st.volunteers.length
      ? [`No volunteer has been seen in the last 2 minutes (${idle} joined earlier).`]
      : ["No volunteers yet. Join with ", h("code", { text: `crowdtrain join ${location.origin}` })]);
  }

  function renderRefusals(st) {
    const items = st.refusals.slice(0, 30).map((r) => h("li", {}, [
      h("span", { class: "when", text: fmtAgo(r.at) }),
      h("span", { class: "who", text: r.volunteer }), ` · round ${r.round}`,
      h("div", { class: "why", text: r.reason }),
    ]));
    $("refusals").replaceChildren(...items);
    $("refusals").hidden = !items.length;
    $("refusals-empty").hidden = !!items.length;
    $("refusals-empty").textContent = "None so far: every contribution was accepted.";
    setText("refusals-hint", items.length ? `${st.refusals.length} most recent` : "");
  }

  function renderRoundsTable(st) {
    const shown = st.rounds.slice(-15).reverse();
    const rows = shown.map((r) => {
      const final = isFinalRow(st, r);
      const state = final ? "final model" : r.state;
      const tps = tokensPerS(r);
      return h("tr", {}, [
        h("td", { class: "num", text: String(r.round) }),
        h("td", {}, [h("span", { class: "tag " + (r.state === "open" && !final ? "tag-open" : "tag-closed"), text: state })]),
        h("td", { class: "num", text: final ? "" : fmtInt(r.contributions) }),
        h("td", { class: "num" + (r.refused ? " bad-num" : " muted"), text: final ? "" : fmtInt(r.refused) }),
        h("td", { class: "num", text: final ? "" : fmtInt(r.tokens) }),
        h("td", { class: "num", text: fmtLoss(r.train_loss) }),
        h("td", { class: "num", text: fmtLoss(r.val_loss) }),
        // bytes in are counted when the round closes
        h("td", { class: "num", text: r.state === "open" ? (final ? "" : "–") : fmtBytes(r.bytes_in) }),
        h("td", { class: "num" + (r.bytes_out ? "" : " muted"), text: final && !r.bytes_out ? "" : fmtBytes(r.bytes_out) }),
        h("td", { class: "num", text: r.closed_at != null ? fmtDur(duration(r)) : "–" }),
        h("td", { class: "num", text: tps == null ? "–" : fmtRate(tps) }),
      ]);
    });
    setText("rounds-hint", st.rounds.length > shown.length ? `newest ${shown.length} of ${st.rounds.length}` : "newest first");
    setEmpty("rounds-table", "rounds-empty", rows, ["No rounds yet."]);
  }

  function render(st) {
    renderHeader(st);
    renderKpis(st);
    renderLoss(st);
    renderLeaderboard(st);
    renderTimeline(st);
    renderTimelineStats(st);
    renderVolunteers(st);
    renderBars(st);
    renderRefusals(st);
    renderRoundsTable(st);
    renderClock();
  }

  // ------------------------------------------------------------------ polling

  function showConn(message) {
    const c = $("conn");
    offline = !!message;
    c.hidden = !message;
    c.textContent = message || "";
    if (message) {
      const pill = $("state-pill");
      pill.className = "pill pill-wait";
      pill.textContent = "offline";
    }
  }

  async function poll() {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 8000);
    let st = null;
    try {
      const res = await fetch("v1/status", { cache: "no-store", signal: ctl.signal });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      st = await res.json();
      const date = Date.parse(res.headers.get("date") || "");
      if (isFinite(date)) {
        const d = date / 1000 - Date.now() / 1000;
        skew = Math.abs(d) > 3 ? d : 0;  // Date has 1 s resolution: ignore small differences
      }
    } catch (e) {
      const since = lastOkAt ? ` Showing what it said ${fmtDur((Date.now() - lastOkAt) / 1000)} ago.` : "";
      const why = e && e.name === "AbortError" ? "timed out" : (e && e.message) || String(e);
      showConn(`Cannot reach the coordinator (${why}).${since} Retrying every ${POLL_MS / 1000} s.`);
      if (!last) setText("run-name", "crowdtrain");
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
    if (st) {
      last = st;
      lastOkAt = Date.now();
      showConn("");
      render(st);  // a bug here surfaces in the console, not as a connection problem
    }
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (last) render(last); }, 150);
  });
  setInterval(renderClock, 1000);
  poll();
})();
