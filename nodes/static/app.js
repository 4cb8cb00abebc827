// flowrun live page: the power flow over the WebSocket, today's energy and the capacity tariff
// over the JSON API (the contract of the `http_api` node). Plain JS, no build step, no
// dependencies. Every field may be missing or null: it shows as "–", never as an error.
"use strict";

(() => {
  const DASH = "\u2013";
  const NBSP = "\u00a0";
  const params = new URLSearchParams(window.location.search);
  const DEVICE = (params.get("device") || "demo").trim() || "demo";
  const TOKEN = params.get("token") || "";
  const DEV = encodeURIComponent(DEVICE);

  const TODAY_EVERY_MS = 60_000;
  const CAPACITY_EVERY_MS = 30_000;
  const STALE_AFTER_S = 20;
  const BACKOFF_MAX_S = 30;
  const IDLE_W = 10; // below this an arrow is drawn as an idle dashed line
  const FULL_SCALE_W = 10_000; // the widest arrow
  const MIN_BILLED_PEAK_KW = 2.5; // Flanders: a month peak is billed at least 2.5 kW

  // --- small, total helpers: they accept anything and never throw -------------------------

  /** A finite number, or null (null, undefined, NaN, strings that are not numbers...). */
  function num(v) {
    if (typeof v === "number") return Number.isFinite(v) ? v : null;
    if (typeof v === "string" && v.trim() !== "") {
      const n = Number(v);
      return Number.isFinite(n) ? n : null;
    }
    return null;
  }

  /** A plain object, or {} for anything else. */
  function obj(v) {
    return v !== null && typeof v === "object" && !Array.isArray(v) ? v : {};
  }

  /** The first argument that is a number. */
  function firstNum(...values) {
    for (const v of values) {
      const n = num(v);
      if (n !== null) return n;
    }
    return null;
  }

  const formats = new Map();
  function fmt(value, digits) {
    let f = formats.get(digits);
    if (!f) {
      f = new Intl.NumberFormat(undefined, {
        minimumFractionDigits: digits,
        maximumFractionDigits: digits,
      });
      formats.set(digits, f);
    }
    return f.format(value);
  }

  /** Watts as "850 W" or "3.25 kW" (magnitude only: the caller says which way it flows). */
  function fmtPower(w) {
    const n = num(w);
    if (n === null) return DASH;
    const a = Math.abs(n);
    if (a < 999.5) return `${fmt(a, 0)}${NBSP}W`;
    const kw = a / 1000;
    return `${fmt(kw, kw < 10 ? 2 : 1)}${NBSP}kW`;
  }

  function fmtKw(kw) {
    const n = num(kw);
    return n === null ? DASH : `${fmt(n, n < 100 ? 2 : 1)}${NBSP}kW`;
  }

  function fmtKwh(kwh) {
    const n = num(kwh);
    return n === null ? DASH : `${fmt(n, Math.abs(n) < 100 ? 2 : 1)}${NBSP}kWh`;
  }

  function fmtPct(pct, digits = 0) {
    const n = num(pct);
    return n === null ? DASH : `${fmt(n, digits)}${NBSP}%`;
  }

  function fmtEur(eur) {
    const n = num(eur);
    return n === null ? DASH : `\u20ac${NBSP}${fmt(n, 2)}`;
  }

  function fmtAge(s) {
    const n = num(s);
    if (n === null) return DASH;
    if (n < 1) return `<${NBSP}1${NBSP}s`;
    if (n < 60) return `${Math.floor(n)}${NBSP}s`;
    if (n < 3600) return `${Math.floor(n / 60)}${NBSP}min ${Math.floor(n % 60)}${NBSP}s`;
    if (n < 86400) return `${Math.floor(n / 3600)}${NBSP}h ${Math.floor((n % 3600) / 60)}${NBSP}min`;
    return `${Math.floor(n / 86400)}${NBSP}d`;
  }

  /** "14:30" in the browser's time zone, or null. */
  function fmtClock(iso) {
    if (typeof iso !== "string") return null;
    const t = Date.parse(iso);
    if (!Number.isFinite(t)) return null;
    return new Date(t).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  }

  const $ = (id) => document.getElementById(id);

  function setText(id, text) {
    const el = $(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function setAttr(el, name, value) {
    if (!el) return;
    if (value === null) el.removeAttribute(name);
    else if (el.getAttribute(name) !== value) el.setAttribute(name, value);
  }

  // --- HTTP -------------------------------------------------------------------------------

  /** A URL relative to the page, so the page also works behind a path prefix. */
  function pageUrl(path) {
    return new URL(path, document.baseURI);
  }

  async function fetchJson(path) {
    const headers = { Accept: "application/json" };
    if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
    const res = await fetch(pageUrl(path), { headers, cache: "no-store" });
    let body = null;
    try {
      body = await res.json();
    } catch {
      body = null;
    }
    if (res.status === 401) unauthorised = true;
    if (!res.ok) {
      const why = typeof obj(body).error === "string" ? obj(body).error : res.statusText;
      throw new Error(`HTTP ${res.status}${why ? `: ${why}` : ""}`);
    }
    return body;
  }

  /** Run `task` now and then `everyMs` after each run ends, and at once when the tab shows
   * again after a pause longer than the period. */
  function every(everyMs, task) {
    let timer = null;
    let last = 0;
    let busy = false;
    const run = async () => {
      if (busy) return;
      busy = true;
      clearTimeout(timer);
      last = Date.now();
      try {
        await task();
      } finally {
        busy = false;
        timer = setTimeout(run, everyMs);
      }
    };
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && Date.now() - last > everyMs) run();
    });
    run();
  }

  // --- the power flow ---------------------------------------------------------------------

  const HUB = { x: 200, y: 170, r: 7 };
  const NODE_R = 32;
  const NODES = {
    pv: { x: 200, y: 52 },
    grid: { x: 74, y: 170 },
    house: { x: 326, y: 170 },
    battery: { x: 200, y: 304 },
  };

  /** The two ends of the link between a node and the hub, just off both circles. */
  function linkEnds(node) {
    const n = NODES[node];
    const dx = HUB.x - n.x;
    const dy = HUB.y - n.y;
    const len = Math.hypot(dx, dy);
    const ux = dx / len;
    const uy = dy / len;
    const a = NODE_R + 4;
    const b = HUB.r + 5;
    return [
      { x: n.x + ux * a, y: n.y + uy * a },
      { x: HUB.x - ux * b, y: HUB.y - uy * b },
    ];
  }

  /** Arrow width in SVG units: grows with the square root of the power, so 100 W is still
   * visible next to 8 kW. */
  function arrowWidth(w) {
    const f = Math.min(Math.abs(w), FULL_SCALE_W) / FULL_SCALE_W;
    return 3 + 15 * Math.sqrt(f);
  }

  /** The outline of an arrow from p to q of shaft width w. */
  function arrowPath(p, q, w) {
    const dx = q.x - p.x;
    const dy = q.y - p.y;
    const len = Math.hypot(dx, dy) || 1;
    const ux = dx / len;
    const uy = dy / len;
    const nx = -uy;
    const ny = ux;
    const head = Math.min(len * 0.6, Math.max(9, w * 1.3));
    const half = w / 2;
    const headHalf = Math.max(7, w * 0.95);
    const bx = q.x - ux * head;
    const by = q.y - uy * head;
    const pts = [
      [p.x + nx * half, p.y + ny * half],
      [bx + nx * half, by + ny * half],
      [bx + nx * headHalf, by + ny * headHalf],
      [q.x, q.y],
      [bx - nx * headHalf, by - ny * headHalf],
      [bx - nx * half, by - ny * half],
      [p.x - nx * half, p.y - ny * half],
    ];
    return `M${pts.map(([x, y]) => `${x.toFixed(1)} ${y.toFixed(1)}`).join("L")}Z`;
  }

  /**
   * Draw one link. `power` is in W; `towardsHub` says which way a positive value flows.
   * `kind` is the CSS class of an active arrow (or a function of the sign).
   */
  function drawLink(node, power, towardsHub, kind) {
    const el = $(`link-${node}`);
    if (!el) return;
    const [atNode, atHub] = linkEnds(node);
    const w = num(power);
    if (w === null || Math.abs(w) < IDLE_W) {
      setAttr(el, "class", "link idle");
      setAttr(el, "d", `M${atNode.x} ${atNode.y}L${atHub.x} ${atHub.y}`);
      return;
    }
    const inward = w > 0 ? towardsHub : !towardsHub;
    const cls = typeof kind === "function" ? kind(w) : kind;
    setAttr(el, "class", `link ${cls}`);
    setAttr(el, "d", inward ? arrowPath(atNode, atHub, arrowWidth(w)) : arrowPath(atHub, atNode, arrowWidth(w)));
  }

  function direction(w, positive, negative, idle = "idle") {
    const n = num(w);
    if (n === null) return "";
    if (Math.abs(n) < IDLE_W) return idle;
    return n > 0 ? positive : negative;
  }

  function renderFlow(data) {
    const d = obj(data);
    const pv = num(d.pv_power_w);
    const battery = num(d.battery_power_w); // + charging
    const grid = num(d.grid_power_w); // + import
    const load = num(d.load_power_w);
    const soc = num(d.battery_soc_pct);
    const selfSuff = num(d.self_sufficiency_pct);

    setText("pv-power", fmtPower(pv));
    setText("battery-power", fmtPower(battery));
    setText("battery-state", direction(battery, "charging", "discharging"));
    setText("battery-soc", soc === null ? DASH : fmtPct(soc));
    setText("grid-power", fmtPower(grid));
    setText("grid-state", direction(grid, "importing", "exporting"));
    setText("house-power", fmtPower(load));
    setText("house-state", selfSuff === null ? "" : `${fmtPct(selfSuff)} own energy`);

    const fill = $("soc-fill");
    setAttr(fill, "width", soc === null ? "0" : (23 * Math.min(100, Math.max(0, soc)) / 100).toFixed(1));

    // PV only produces; the house only consumes; the battery charges (+) from the hub; the
    // grid imports (+) into the hub.
    drawLink("pv", pv === null ? null : Math.max(0, pv), true, "pv");
    drawLink("house", load === null ? null : Math.max(0, load), false, "house");
    drawLink("battery", battery, false, "battery");
    drawLink("grid", grid, true, (w) => (w > 0 ? "import" : "export"));

    const parts = [
      `Solar ${fmtPower(pv)}`,
      `battery ${direction(battery, "charging", "discharging") || "unknown"} ${fmtPower(battery)} at ${soc === null ? "unknown charge" : fmtPct(soc)}`,
      `house using ${fmtPower(load)}`,
      `grid ${direction(grid, "importing", "exporting") || "unknown"} ${fmtPower(grid)}`,
    ];
    setText("flow-svg-desc", `${parts.join("; ")}.`);
  }

  // --- the snapshot stream ----------------------------------------------------------------

  let ageAtReceipt = null; // s, as the server said when it sent the snapshot
  let receivedAt = 0; // performance.now() at receipt
  let socket = null;
  let attempt = 0;
  let retryTimer = null;
  let countdownTimer = null;
  let unauthorised = false; // an API call answered 401: the token is missing or wrong

  /** The connection indicator; `retry` (the countdown) is hidden from screen readers, so
   * the status region is announced on a change of state, not every second. */
  function setConn(state, text, retry = "") {
    const el = $("conn");
    setAttr(el, "data-state", state);
    setText("conn-text", text);
    setText("conn-retry", retry);
  }

  function onSnapshot(msg) {
    const m = obj(msg);
    let age = num(m.age_s);
    if (age === null && typeof m.ts === "string") {
      const t = Date.parse(m.ts);
      if (Number.isFinite(t)) age = Math.max(0, (Date.now() - t) / 1000);
    }
    ageAtReceipt = age;
    receivedAt = performance.now();
    renderFlow(m.data);
    renderAge();
  }

  function renderAge() {
    if (ageAtReceipt === null) {
      setText("snapshot-age", DASH);
      setAttr($("age-wrap"), "data-stale", "false");
      return;
    }
    const age = ageAtReceipt + (performance.now() - receivedAt) / 1000;
    setText("snapshot-age", fmtAge(age));
    setAttr($("age-wrap"), "data-stale", age > STALE_AFTER_S ? "true" : "false");
  }

  function wsUrl() {
    const u = pageUrl(`ws/v1/realtime/${DEV}`);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    if (TOKEN) u.searchParams.set("token", TOKEN);
    return u.toString();
  }

  function connect() {
    clearTimeout(retryTimer);
    clearInterval(countdownTimer);
    retryTimer = null;
    setConn(attempt === 0 ? "connecting" : "reconnecting", "Connecting…");
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch {
      scheduleReconnect();
      return;
    }
    socket = ws;
    let gotFrame = false;
    ws.addEventListener("open", () => {
      setConn("live", "Live · waiting for data");
    });
    ws.addEventListener("message", (ev) => {
      if (typeof ev.data !== "string") return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return; // not a snapshot: ignored
      }
      if (!gotFrame) {
        gotFrame = true;
        attempt = 0; // a connection that delivers resets the backoff
        setConn("live", "Live");
      }
      onSnapshot(msg);
    });
    ws.addEventListener("close", (ev) => {
      if (socket !== ws) return;
      socket = null;
      scheduleReconnect(ev.code === 1008 || ev.code === 4401 || ev.code === 4403 ? "not authorised" : "");
    });
    // an error is always followed by a close: the reconnect is scheduled there
  }

  /** Exponential backoff with jitter: about 1, 2, 4 ... 30 s. */
  function scheduleReconnect(why = "") {
    if (retryTimer !== null) return;
    const base = Math.min(BACKOFF_MAX_S, 2 ** attempt);
    attempt += 1;
    const delayS = base * (0.75 + Math.random() * 0.5);
    const until = performance.now() + delayS * 1000;
    const tick = () => {
      const left = Math.max(0, Math.ceil((until - performance.now()) / 1000));
      const reason = why || (unauthorised ? "not authorised: check ?token=" : "");
      const prefix = reason ? `Disconnected (${reason})` : "Disconnected";
      setConn(attempt > 3 ? "offline" : "reconnecting", prefix, ` · retry in ${left}${NBSP}s`);
    };
    tick();
    countdownTimer = setInterval(tick, 1000);
    retryTimer = setTimeout(connect, delayS * 1000);
  }

  window.addEventListener("online", () => {
    if (socket === null) connect();
  });

  // --- today's energy ---------------------------------------------------------------------

  function renderToday(body) {
    const s = obj(body);
    const t = obj(s.totals);
    setText("today-pv", fmtKwh(firstNum(s.pv_kwh, t.pv_kwh)));
    setText("today-import", fmtKwh(firstNum(s.import_kwh, t.import_kwh)));
    setText("today-export", fmtKwh(firstNum(s.export_kwh, t.export_kwh)));
    setText("today-load", fmtKwh(firstNum(s.load_kwh, t.load_kwh)));
    setText("today-charge", fmtKwh(firstNum(s.battery_charge_kwh, t.battery_charge_kwh)));
    setText("today-discharge", fmtKwh(firstNum(s.battery_discharge_kwh, t.battery_discharge_kwh)));
    // fractions 0..1 by the contract; a *_pct field is taken as it is
    const ss = num(s.self_sufficiency);
    const sc = num(s.self_consumption);
    setText("today-selfsuff", fmtPct(ss !== null ? ss * 100 : num(s.self_sufficiency_pct), 1));
    setText("today-selfcons", fmtPct(sc !== null ? sc * 100 : num(s.self_consumption_pct), 1));
    const since = fmtClock(s.start);
    const now = new Date().toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
    const warnings = Array.isArray(s.warnings) ? s.warnings.filter((w) => typeof w === "string") : [];
    const extra = warnings.length ? ` · ${warnings[0]}` : "";
    setText("today-note", `${since ? `Since ${since}` : "Today"} · updated ${now}${extra}`);
  }

  async function refreshToday() {
    try {
      renderToday(await fetchJson(`api/v1/self-sufficiency/${DEV}?period=today`));
    } catch (err) {
      setText("today-note", `Could not update today's energy (${err instanceof Error ? err.message : "error"}).`);
    }
  }

  // --- the capacity tariff ----------------------------------------------------------------

  const GAUGE = { cx: 120, cy: 120, r: 100 };

  function gaugePoint(fraction, r = GAUGE.r) {
    const a = Math.PI * (1 - Math.min(1, Math.max(0, fraction)));
    return { x: GAUGE.cx + r * Math.cos(a), y: GAUGE.cy - r * Math.sin(a) };
  }

  /** A round scale end above `kw`: 1, 2, 2.5, 5 x 10^n. */
  function niceCeil(kw) {
    const p = 10 ** Math.floor(Math.log10(kw));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= kw) return m * p;
    return 10 * p;
  }

  function renderCapacity(body) {
    const c = obj(body);
    const rq = obj(c.running_quarter);
    const mp = obj(c.month_peak ?? c.peak);
    const projected = num(rq.projected_kw);
    const peak = num(mp.kw);
    const target = num(c.target_kw);
    const threshold = firstNum(rq.threshold_kw) ?? Math.max(MIN_BILLED_PEAK_KW, peak ?? 0);
    const scaleMax = niceCeil(Math.max(1, projected ?? 0, peak ?? 0, threshold, target ?? 0) * 1.15);

    setText("cap-projected", fmtKw(projected));
    setText(
      "cap-peak",
      peak === null ? DASH : peak < MIN_BILLED_PEAK_KW ? `${fmtKw(peak)} (billed ${fmtKw(MIN_BILLED_PEAK_KW)})` : fmtKw(peak),
    );
    setText("cap-allowed", fmtKw(rq.allowed_kw));
    setText("cap-energy", fmtKwh(rq.energy_kwh));
    setText("cap-rolling", fmtKw(firstNum(c.rolling_12m_avg_kw, obj(c.rolling_average).kw)));
    setText("cap-cost", fmtEur(firstNum(c.month_cost_eur, obj(c.cost).month_incl)));
    setText("cap-month", typeof c.month === "string" ? c.month : DASH);
    const qStart = fmtClock(rq.start);
    const startMs = typeof rq.start === "string" ? Date.parse(rq.start) : NaN;
    const qEnd = fmtClock(rq.end) ?? (Number.isFinite(startMs) ? fmtClock(new Date(startMs + 900_000).toISOString()) : null);
    setText("cap-quarter", qStart && qEnd ? `${qStart}–${qEnd}` : DASH);

    // the gauge
    const gauge = $("gauge");
    const arc = $("gauge-arc");
    if (projected === null) {
      setAttr(arc, "d", null);
    } else {
      const e = gaugePoint(projected / scaleMax);
      setAttr(arc, "d", `M20 120A100 100 0 0 1 ${e.x.toFixed(1)} ${e.y.toFixed(1)}`);
    }
    const tickIn = gaugePoint(threshold / scaleMax, GAUGE.r - 14);
    const tickOut = gaugePoint(threshold / scaleMax, GAUGE.r + 14);
    const mark = $("gauge-peak");
    setAttr(mark, "visibility", projected === null && peak === null ? "hidden" : null);
    setAttr(mark, "x1", tickIn.x.toFixed(1));
    setAttr(mark, "y1", tickIn.y.toFixed(1));
    setAttr(mark, "x2", tickOut.x.toFixed(1));
    setAttr(mark, "y2", tickOut.y.toFixed(1));
    setText("gauge-value", fmtKw(projected));
    setText("gauge-max", `${fmt(scaleMax, Number.isInteger(scaleMax) ? 0 : 1)}${NBSP}kW`);

    let level = "unknown";
    let verdict = "No projection for this quarter yet.";
    if (projected !== null) {
      if (projected > threshold) {
        level = "over";
        const extra = num(rq.extra_cost_eur);
        verdict = `This quarter would set a new month peak: ${fmtKw(projected - threshold)} above ${fmtKw(threshold)}${extra !== null && extra > 0 ? ` (about ${fmtEur(extra)} more this month)` : ""}.`;
      } else if (c.warning === true || projected > 0.9 * threshold) {
        level = "near";
        verdict = `Close to the limit: ${fmtKw(threshold - projected)} below ${fmtKw(threshold)}.`;
      } else {
        level = "ok";
        verdict = `Below this month's peak (${fmtKw(threshold)}): no extra capacity cost.`;
      }
    }
    setAttr(gauge, "data-level", level);
    setAttr($("cap-verdict"), "data-level", level);
    setText("cap-verdict", verdict);
    setText(
      "gauge-desc",
      `Projected ${fmtKw(projected)} this quarter against a month peak of ${fmtKw(threshold)}; scale 0 to ${fmtKw(scaleMax)}.`,
    );

    const list = $("cap-warnings");
    if (list) {
      const warnings = Array.isArray(c.warnings) ? c.warnings.filter((w) => typeof w === "string") : [];
      const key = JSON.stringify(warnings.slice(0, 5));
      if (list.dataset.key !== key) {
        list.dataset.key = key;
        list.replaceChildren(
          ...warnings.slice(0, 5).map((w) => {
            const li = document.createElement("li");
            li.textContent = w;
            return li;
          }),
        );
      }
    }
  }

  async function refreshCapacity() {
    try {
      renderCapacity(await fetchJson(`api/v1/capacity-tariff/${DEV}`));
    } catch (err) {
      setAttr($("cap-verdict"), "data-level", "unknown");
      setText("cap-verdict", `Could not update the capacity tariff (${err instanceof Error ? err.message : "error"}).`);
    }
  }

  // --- start ------------------------------------------------------------------------------

  function start() {
    setText("device-name", DEVICE);
    document.title = `${DEVICE} · live energy`;
    renderFlow({});
    connect();
    setInterval(renderAge, 1000);
    every(TODAY_EVERY_MS, refreshToday);
    every(CAPACITY_EVERY_MS, refreshCapacity);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
