// hydravision dashboard: everything arrives over one Server-Sent Events stream (api/stream); the page never
// polls. Messages: hello (the whole state), tick (all tiles, once per poll), events (new events), redis (Redis
// reachable or not). Text from Redis only ever goes into textContent, never into HTML.
"use strict";

const state = {
  cameras: new Map(),   // camera -> last tile
  history: new Map(),   // camera -> [[t, fps, age_p50, age_p95], ...]
  events: [],           // newest last, at most MAX_EVENTS
  eventIds: new Set(),
  redis: { ok: null },
  pictures: new Map(),
  control: false,       // a controller listens and this dashboard may send it commands  // camera -> {v, data}: the pictures inlined in the last hello
  historyS: 300,
  build: null,          // the version of the page's files its first stream named
  reconnectedTimer: null,
};
const MAX_EVENTS = 500;
const PICTURE_LATE_S = 10;  // a picture this much older than the camera's newest frame is dated, not shown as live
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// A name from Redis inside a line of text, bidi-isolated (U+2068 ... U+2069, invisible): a right-to-left override
// in it (a camera or zone named "x\u202e") no longer reverses the rest of the line ("zone_entered" as "deretne_enoz").
// Text from Redis in an element of its own is isolated as the element (dir=auto, or <bdi>): the same, its text as sent.
const iso = (v) => `\u2068${v}\u2069`;

const fmt = {
  num: (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits)),
  ms: (v) => (v === null || v === undefined ? "–" : Math.round(v).toString()),
  time: (ts) => new Date(ts * 1000).toLocaleTimeString([], { hour12: false }),
  pairs: (obj, skipZero) => {
    const parts = Object.entries(obj || {}).filter(([, v]) => !skipZero || v).map(([k, v]) => `${iso(k)} ${v}`);
    return parts.length ? parts.join(" · ") : "–";  // as every other empty value
  },
};

function drops(tile) {
  // not the frames the camera's fps setting leaves out by design ("rate"), as `hydravision status`: a 25 fps file
  // at fps 10 read as 60% dropped
  const lost = Object.fromEntries(Object.entries(tile.dropped || {}).filter(([reason]) => reason !== "rate"));
  const total = Object.values(lost).reduce((a, b) => a + b, 0);
  return total ? `${total} (${fmt.pairs(lost, true)})` : "0";
}

function countsText(counts, now) {
  // zone: objects inside now by class; line: crossings in / out so far, all classes together. ``now`` false (a
  // camera not up): the zones' objects are those of its last frame, and say so
  const zones = new Map(), lines = new Map();
  for (const z of counts.zones) zones.set(z.zone, [...(zones.get(z.zone) || []), `${z.inside} ${iso(z["class"])}`]);
  for (const l of counts.lines) {
    const [i, o] = lines.get(l.line) || [0, 0];
    lines.set(l.line, [i + l["in"], o + l["out"]]);
  }
  return [...[...zones].map(([name, parts]) => `${iso(name)}: ${parts.join(", ")}${now ? "" : " (last frame)"}`),
    ...[...lines].map(([name, [i, o]]) => `${iso(name)}: ${i} in, ${o} out`)].join(" · ");
}

function stateLabel(tile) {
  // its status gone (a Redis restart empties the hash until the cameras write again): the state and numbers shown are
  // the last ones read, held for 10 s; "up · no status" on a green badge read as live
  if (tile.missing) return `no status · last ${tile.state}, held`;
  const own = { up: "running", reconnecting: "reconnecting" }[tile.state];
  const label = tile.detail && tile.detail !== own ? `${tile.state} · ${tile.detail}` : tile.state;
  // as `hydravision status` says it: its counts span its processes
  return tile.restarts > 0 ? `${label} (restarted ${tile.restarts}x)` : label;
}

// A camera id "." or ".." goes in the query: as a path segment the browser resolves it away (as %2E too), and its
// picture and removal went to another URL.
const dotted = (camera) => camera === "." || camera === "..";

// A picture as the page tells it from another: its version (the frame) and its capture time. The frame alone comes
// again when a camera starts again (a service restart, a camera removed and added again: frames count from 0), and
// the browser shows a URL it loaded before from its own copy, unasked: the earlier run's picture, as the live one.
const pictureKey = (snapshot) => (snapshot.ts === null || snapshot.ts === undefined ? snapshot.v
  : `${snapshot.v}@${snapshot.ts}`);

function snapshotUrl(camera, snapshot) {
  const t = snapshot.ts === null || snapshot.ts === undefined ? "" : `t=${encodeURIComponent(snapshot.ts)}&`;
  const v = `${t}v=${encodeURIComponent(snapshot.v)}`;
  return dotted(camera) ? `api/snapshot.jpg?camera=${encodeURIComponent(camera)}&${v}`
    : `api/cameras/${encodeURIComponent(camera)}/snapshot.jpg?${v}`;
}

// --- the chart: fps and frame age p50 over the kept history, each on its own scale --------------------------
function drawChart(canvas, points) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#2c333d";
  ctx.strokeRect(0.5, 0.5, w - 1, h - 1);
  if (points.length < 2) return;
  // the span shown grows with the history kept, from one minute up to historyS
  const t1 = points[points.length - 1][0];
  const span = Math.min(state.historyS, Math.max(60, t1 - points[0][0]));
  const t0 = t1 - span;
  const x = (t) => ((t - t0) / span) * (w - 2) + 1;
  for (const [index, color] of [[1, "#58a6ff"], [2, "#f0883e"]]) {
    const values = points.map((p) => p[index]).filter((v) => v !== null && v !== undefined);
    const top = Math.max(1, ...values) * 1.15;
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let drawing = false;
    for (const p of points) {
      if (p[index] === null || p[index] === undefined) { drawing = false; continue; }
      const y = h - 2 - (p[index] / top) * (h - 4);
      if (drawing) ctx.lineTo(x(p[0]), y); else ctx.moveTo(x(p[0]), y);
      drawing = true;
    }
    ctx.stroke();
  }
}

// Charts are drawn in one pass after the DOM is updated: a chart reads its size, and a read between writes
// would force the browser to lay the page out once per tile.
let chartsPending = false;
function scheduleCharts() {
  if (chartsPending) return;
  chartsPending = true;
  requestAnimationFrame(() => {
    chartsPending = false;
    for (const canvas of document.querySelectorAll("#grid canvas.chart, #detail canvas.chart")) {
      const camera = canvas.closest("[data-camera]").dataset.camera;
      drawChart(canvas, state.history.get(camera) || []);
    }
  });
}

// --- tiles ---------------------------------------------------------------------------------------------------
function makeTile(camera) {
  const img = el("img", { class: "snap", alt: `latest picture of ${camera}`, hidden: "" });
  const tile = el("article", { class: "tile", "data-camera": camera },
    el("header", {}, el("a", { class: "name", href: `#/camera/${encodeURIComponent(camera)}`, dir: "auto" }, camera),
      el("span", { class: "state" }, "")),
    el("a", { class: "pic", href: `#/camera/${encodeURIComponent(camera)}` }, img,
      el("div", { class: "placeholder" }, "no snapshot yet"), el("span", { class: "when", hidden: "" })),
    el("div", { class: "error", hidden: "" }, el("span", { class: "prefix" }), el("bdi")),
    el("dl", { class: "stats" },
      el("dt", {}, "fps"), el("dd", { class: "fps" }),
      el("dt", {}, "frame age"), el("dd", { class: "age" }),
      el("dt", {}, "drops"), el("dd", { class: "drops" }),
      el("dt", {}, "tracks"), el("dd", { class: "tracks" }),
      el("dt", { class: "counts-row" }, "zones/lines"), el("dd", { class: "counts counts-row" })),
    el("canvas", { class: "chart" }),
    el("div", { class: "legend" }, el("span", { class: "fps" }, "— fps"), "  ",
      el("span", { class: "age" }, "— frame age p50"), "  (up to 5 min)"));
  return tile;
}

function showPicture(container, camera, snapshot) {
  const img = container.querySelector("img.snap");
  const placeholder = container.querySelector(".placeholder");
  const show = (src) => {
    img.src = src;
    img.dataset.v = key;
    img.dataset.frame = snapshot.frame ?? "";
    img.hidden = false; placeholder.hidden = true;
  };
  if (!snapshot) {
    img.hidden = true; placeholder.hidden = false; img.removeAttribute("data-v"); delete img.dataset.loading;
    return;
  }
  const key = pictureKey(snapshot);
  if (img.dataset.v === key) return;
  const inline = state.pictures.get(camera);
  if (inline && inline.v === snapshot.v) {  // came with the hello: no request
    delete img.dataset.loading;  // one still loading is older
    show(inline.data);
    return;
  }
  // none for a picture out of view (the grid's tiles behind the detail view): every tile's was downloaded at every
  // tick for nothing; they are fetched when the grid shows again (see the hashchange listener)
  if (container.closest("[hidden]")) return;
  // one request at a time, the newest asked for once it is in: on a link slower than the pictures each tick
  // started one more, for pictures long replaced, without end
  if (img.dataset.loading) return;
  img.dataset.loading = key;
  const next = new Image();  // decode first, then swap: no flicker
  next.onload = () => {
    if (img.dataset.loading !== key) return;
    delete img.dataset.loading;
    show(next.src);
    const latest = (state.cameras.get(camera) || {}).snapshot;
    if (img.isConnected && latest && pictureKey(latest) !== key) showPicture(container, camera, latest);
  };
  next.onerror = () => { if (img.dataset.loading === key) delete img.dataset.loading; };
  next.src = snapshotUrl(camera, snapshot);
}

// Text set only when it changed: text replaced at every tick took away an operator's selection in it.
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// The same for rows (the detail view's tables and recent events): ``key`` names what they show, rows() builds them.
function setRows(node, key, rows) {
  if (node.dataset.key === key) return;
  node.dataset.key = key;
  node.replaceChildren(...rows());
}

function fillStats(root, tile) {
  root.dataset.state = tile.state;
  root.dataset.fps = tile.fps;
  setText(root.querySelector(".state"), stateLabel(tile));
  root.querySelector(".state").title = tile.detail || "";
  const error = root.querySelector(".error");
  const problem = tile.state !== "up" ? tile.error : tile.redis_error;
  error.hidden = !problem;
  // the error is text from Redis (its camera's URL in it): in a <bdi>, a bidi control in it reorders none of the page's
  setText(error.querySelector(".prefix"), problem && tile.state === "up" ? "Redis: " : "");
  setText(error.querySelector("bdi"), problem || "");
  const held = tile.missing ? " (held)" : "";  // its last values, no fresh status: greyed below, and said
  setText(root.querySelector("dd.fps"), `${fmt.num(tile.fps)} analysed · ${fmt.num(tile.decode_fps)} decoded${held}`);
  setText(root.querySelector("dd.age"), `p50 ${fmt.ms(tile.age_p50)} / p95 ${fmt.ms(tile.age_p95)} ms${held}`);
  // set as a property (CSSOM), which the page's Content-Security-Policy allows, unlike a style attribute
  for (const node of [root.querySelector(".state"), ...root.querySelectorAll(".stats dd")]) {
    node.style.opacity = held ? "0.5" : "";
  }
  setText(root.querySelector("dd.drops"), drops(tile));
  // a camera not up shows its last picture, dated; so does one up whose pictures stopped (it still sends frames)
  const when = root.querySelector(".pic .when");
  const late = tile.picture_behind_s > PICTURE_LATE_S;
  when.hidden = (tile.state === "up" && !late) || !tile.snapshot || !tile.snapshot.ts;
  if (!when.hidden) setText(when, `last picture ${fmt.time(tile.snapshot.ts)}`);
  // "yet" promised a picture to a camera whose snapshots were switched off, or that failed or ended for good
  const over = ["failed", "ended", "stopped"].includes(tile.detail);
  setText(root.querySelector(".pic .placeholder"), tile.snapshots_off ? "snapshots off for this camera"
    : over ? `no picture (${tile.detail})` : "no snapshot yet");
  setText(root.querySelector("dd.tracks"), tile.tracks ? fmt.pairs(tile.tracks) : "–");
  for (const node of root.querySelectorAll(".counts-row")) node.hidden = !tile.counts;
  if (tile.counts) setText(root.querySelector("dd.counts"), countsText(tile.counts, tile.occupancy_now));
}

// camera -> its tile in the grid: a search of the grid for each camera made a tick's work grow with the square of
// the cameras (with 2000, renderTiles took 0.38 s a tick, 0.12 s without the searches)
const tileNodes = new Map();

function renderTiles() {
  const grid = $("#grid");
  const seen = new Set();
  let before = null;  // the tile the next one goes after
  for (const [camera, tile] of [...state.cameras].sort(([a], [b]) => a.localeCompare(b))) {
    seen.add(camera);
    let node = tileNodes.get(camera);
    if (!node) tileNodes.set(camera, node = makeTile(camera));
    // keeps the order sorted as cameras come and go, moving a tile only when out of place: a move takes the
    // keyboard focus and the selection out of it (every tick, when every tile was appended again)
    const place = before ? before.nextSibling : grid.firstChild;
    if (node !== place) grid.insertBefore(node, place);
    before = node;
    fillStats(node, tile);
    showPicture(node, camera, tile.snapshot);
  }
  scheduleCharts();
  for (const [camera, node] of tileNodes) if (!seen.has(camera)) { node.remove(); tileNodes.delete(camera); }
  $("#empty").hidden = state.cameras.size > 0;
  const by = { up: 0, reconnecting: 0, down: 0 };
  for (const t of state.cameras.values()) by[t.state] = (by[t.state] || 0) + 1;
  $("#summary").textContent =
    `${state.cameras.size} camera${state.cameras.size === 1 ? "" : "s"}: ${by.up} up, ${by.reconnecting} reconnecting, ${by.down} down`;
  updateCameraFilter();
  if (currentDetail()) renderDetail();
}

// --- the events feed -------------------------------------------------------------------------------------------
function describe(e) {
  // what an operator reads; the rest (frame, pts, boxes, ...) is in Redis for programs
  const skip = new Set(["v", "type", "camera", "ts", "id", "group", "frame", "pts", "entered_pts", "left_pts",
    "box", "class_id", "conf", "track_ids"]);
  const parts = [];
  if (e.head !== undefined) parts.push(`${iso(e.head)}/${iso(e["class"] ?? "?")}#${iso(e.track_id ?? "-")}`);
  if (e.zone !== undefined) parts.push(`zone ${iso(e.zone)}`);
  if (e.line !== undefined) parts.push(`line ${iso(e.line)} ${iso(e.direction ?? "")}`);
  for (const k of ["head", "class", "track_id", "zone", "line", "direction"]) skip.add(k);
  const plain = (v) => v !== null && typeof v !== "object";
  const text = (v) => iso(typeof v === "number" && !Number.isInteger(v) ? v.toFixed(2) : v);
  for (const [k, v] of Object.entries(e)) {
    if (skip.has(k)) continue;
    // a list of plain values is shown joined (camera_updated's changes, camera_added's heads); an object, or a list
    // holding one, is for programs
    if (Array.isArray(v) && v.length && v.every(plain)) parts.push(`${iso(k)} ${v.map(text).join(", ")}`);
    else if (plain(v)) parts.push(`${iso(k)} ${text(v)}`);
  }
  return parts.join(" · ");
}

function eventItem(e) {
  return el("li", { "data-id": e.id, "data-type": e.type, "data-group": e.group, "data-camera": e.camera },
    el("span", { class: "t" }, fmt.time(e.ts)), " ", el("span", { class: "cam" }, e.camera), " ",
    el("span", { class: "type" }, e.type), " ", describe(e));
}

function visible(e, camera, groups) {
  return (!camera || e.camera === camera) && groups.has(e.group);
}

function filters() {
  const groups = new Set([...document.querySelectorAll("#filter-types input:checked")].map((i) => i.value));
  return [$("#filter-camera").value, groups];
}

// live: events as they happen; a page's first backlog is history (the cameras it came with are the current set,
// and a camera removed then added again must not vanish for a camera_removed of its past)
function addEvents(events, live = true) {
  const fresh = events.filter((e) => e && e.id && !state.eventIds.has(e.id));
  if (!fresh.length) return;
  for (const e of fresh) { state.eventIds.add(e.id); state.events.push(e); }
  while (state.events.length > MAX_EVENTS) state.eventIds.delete(state.events.shift().id);
  const feed = $("#feed");
  const [camera, groups] = filters();
  for (const e of fresh) {
    const item = eventItem(e);
    item.hidden = !visible(e, camera, groups);
    feed.prepend(item);
  }
  while (feed.children.length > MAX_EVENTS) feed.lastElementChild.remove();
  if (live && fresh.some((e) => e.type === "camera_removed")) {
    for (const e of fresh) if (e.type === "camera_removed") { state.cameras.delete(e.camera); state.history.delete(e.camera); }
    renderTiles();
  }
  if (currentDetail()) renderDetailEvents();
}

function applyFilters() {
  const [camera, groups] = filters();
  const byId = new Map(state.events.map((e) => [e.id, e]));
  for (const item of $("#feed").children) {
    const e = byId.get(item.dataset.id);
    item.hidden = !e || !visible(e, camera, groups);
  }
}

// one option per camera that a tile or a kept event names. An event's camera may be anything (none, a number:
// never equal to an option's value, one more option at every tick) or a new name each time: options are removed
// with the last event and tile that named them (the one selected stays), so the list stays bounded. "*" names
// no camera: the service's events about all of them (publisher_error, node_lost), shown under "all".
const ALL_CAMERAS = "*";
function updateCameraFilter() {
  const select = $("#filter-camera");
  const names = new Set([...state.cameras.keys(), ...state.events.map((e) => e.camera)]
    .filter((name) => typeof name === "string" && name && name !== ALL_CAMERAS));
  for (const o of [...select.options]) if (o.value && !names.has(o.value) && !o.selected) o.remove();
  const known = new Set([...select.options].map((o) => o.value));
  for (const name of [...names].sort()) {
    if (!known.has(name)) select.append(el("option", { value: name }, name));
  }
}

// --- the camera detail view ------------------------------------------------------------------------------------
function currentDetail() {
  const m = location.hash.match(/^#\/camera\/(.+)$/);
  if (!m) return null;
  try {
    return decodeURIComponent(m[1]);
  } catch (err) {  // a link cut short or written by hand ("cam%"): the id as written, not a page that never connects
    return m[1];
  }
}

function renderDetail() {
  const camera = currentDetail();
  $("#grid-view").hidden = !!camera;
  $("#detail-view").hidden = !camera;
  if (!camera) return;
  const root = $("#detail");
  if (root.dataset.camera !== camera) {
    root.replaceChildren();
    root.dataset.camera = camera;
    root.append(
      el("h2", {}, el("bdi", {}, camera), " ", el("span", { class: "state" })),
      el("div", { class: "cols" },
        el("div", {}, el("div", { class: "pic" }, el("img", { class: "snap", alt: `latest picture of ${camera}`, hidden: "" }),
          el("div", { class: "placeholder" }, "no snapshot yet"), el("span", { class: "when", hidden: "" })),
          el("canvas", { class: "chart" }),
          el("div", { class: "legend" }, el("span", { class: "fps" }, "— fps"), "  ", el("span", { class: "age" }, "— frame age p50"))),
        el("div", {},
          el("div", { class: "error", hidden: "" }, el("span", { class: "prefix" }), el("bdi")),
          el("dl", { class: "stats" },
            el("dt", {}, "fps"), el("dd", { class: "fps" }),
            el("dt", {}, "frame age"), el("dd", { class: "age" }),
            el("dt", {}, "drops"), el("dd", { class: "drops" }),
            el("dt", {}, "tracks"), el("dd", { class: "tracks" }),
            el("dt", { class: "counts-row" }, "zones/lines"), el("dd", { class: "counts counts-row" }),
            el("dt", {}, "source"), el("dd", { class: "url" }),
            el("dt", {}, "reconnects"), el("dd", { class: "reconnects" })),
          el("h2", { class: "heads-row" }, "Heads"), el("table", { class: "heads heads-row" }),
          el("h2", { class: "counts-row" }, "Zones and lines"), el("table", { class: "zones counts-row" }),
          el("p", {}, el("button", { type: "button", class: "remove", hidden: "" }, "Remove camera"), " ",
            el("span", { class: "result", role: "status" })),
          el("h2", {}, "Recent events"), el("ol", { class: "events recent" }))));
    root.querySelector("button.remove").addEventListener("click", () => removeCamera(camera, root.querySelector(".result")));
  }
  const tile = state.cameras.get(camera);
  root.querySelector("button.remove").hidden = !state.control || !tile;
  root.dataset.state = tile ? tile.state : "down";
  // a camera gone (removed) keeps nothing of its last status beside the badge: its error, source, reconnects and
  // heads read as the camera's now
  for (const node of root.querySelectorAll(".stats, .heads-row")) node.hidden = !tile;
  if (!tile) {
    setText(root.querySelector(".state"), "not in Redis (removed?)");
    root.querySelector(".state").title = "";
    for (const node of root.querySelectorAll(".error, .counts-row")) node.hidden = true;
    return;
  }
  fillStats(root, tile);
  setText(root.querySelector(".url"), tile.url || "–");
  setText(root.querySelector(".reconnects"), String(tile.reconnects ?? 0));
  setRows(root.querySelector("table.heads"), JSON.stringify([tile.heads, tile.tracks]), () => [
    el("tr", {}, el("th", {}, "head"), el("th", {}, "tracks now")),
    ...tile.heads.map((h) => el("tr", {}, el("td", {}, h), el("td", {}, String((tile.tracks || {})[h] ?? "–"))))]);
  if (tile.counts) {
    const inside = tile.occupancy_now ? "inside" : "inside at its last frame";  // a camera not up
    setRows(root.querySelector("table.zones"), JSON.stringify([tile.counts, inside]), () => [
      el("tr", {}, el("th", {}, "zone / line"), el("th", {}, "head"), el("th", {}, "class"), el("th", {}, "count")),
      ...tile.counts.zones.map((z) => el("tr", {}, el("td", {}, `zone ${z.zone}`), el("td", {}, z.head),
        el("td", {}, z["class"]), el("td", {}, `${z.inside} ${inside}`))),
      ...tile.counts.lines.map((l) => el("tr", {}, el("td", {}, `line ${l.line}`), el("td", {}, l.head), el("td", {}, l["class"]), el("td", {}, `${l["in"]} in / ${l["out"]} out`)))]);
  }
  showPicture(root, camera, tile.snapshot);
  scheduleCharts();
  renderDetailEvents();
}

function renderDetailEvents() {
  const camera = currentDetail();
  const list = $("#detail .recent");
  if (!list) return;
  const mine = state.events.filter((e) => e.camera === camera).slice(-50).reverse();
  setRows(list, mine.map((e) => e.id).join(" "), () => mine.map(eventItem));
}

// --- the Redis notice and the stream ---------------------------------------------------------------------------
function notice(kind, text) {
  const n = $("#notice");
  n.dataset.state = kind;
  n.textContent = text;
  n.hidden = kind === "ok";
}

function setRedis(redis) {
  const was = state.redis.ok;
  state.redis = redis;
  clearTimeout(state.reconnectedTimer);
  document.body.classList.toggle("frozen", redis.ok === false);
  if (redis.ok === false) {
    notice("down", `Redis unreachable since ${fmt.time(redis.since)} (${iso(redis.error || "no answer")}); ` +
      "reconnecting… Tiles show the last values read.");
  } else if (redis.ok && was === false) {
    notice("reconnected", `Reconnected to Redis at ${fmt.time(redis.since)}; live data again.`);
    // only that notice: an "offline" said since (the dashboard lost) stays; hidden, the tiles were greyed unexplained
    state.reconnectedTimer = setTimeout(() => { if ($("#notice").dataset.state === "reconnected") notice("ok", ""); },
      10000);
  } else if (redis.ok) {
    notice("ok", "");
  }
}

function takeTiles(tiles) {
  const now = new Set();
  for (const t of tiles) {
    now.add(t.camera);
    const before = state.cameras.get(t.camera);
    state.cameras.set(t.camera, t);
    const h = state.history.get(t.camera) || [];
    // one point per poll; a tile repeated (hello, then the same tick) adds nothing
    if (!before || before !== t) h.push([Date.now() / 1000, t.fps, t.age_p50, t.age_p95]);
    while (h.length && h[0][0] < Date.now() / 1000 - state.historyS) h.shift();
    state.history.set(t.camera, h);
  }
  for (const camera of [...state.cameras.keys()]) {
    if (!now.has(camera)) { state.cameras.delete(camera); state.history.delete(camera); }
  }
}

function connect() {
  const source = new EventSource("api/stream");
  // the page's files as the server has them: changed (an upgrade), the page loads them anew, where the operator
  // was; its stream reconnects by itself, and ran the old script against the new server until someone reloaded
  source.addEventListener("build", (m) => {
    if (state.build && state.build !== m.data) location.reload();
    state.build = m.data;
  });
  source.addEventListener("hello", (m) => {
    window.hvHelloAt = window.hvHelloAt || performance.now();  // for load-time measurements
    const hello = JSON.parse(m.data);
    state.historyS = 300;
    $("#source").textContent = `Redis keys ${hello.prefix}:* · pushed every ${hello.interval_s} s`;
    state.cameras.clear();
    state.history.clear();
    for (const t of hello.cameras) state.cameras.set(t.camera, t);
    state.pictures = new Map(Object.entries(hello.pictures || {}));
    setControl(hello.control);
    const offset = Date.now() / 1000 - hello.now;  // history is on the server's clock
    for (const [camera, points] of Object.entries(hello.history)) {
      state.history.set(camera, points.map(([t, ...rest]) => [t + offset, ...rest]));
    }
    if ($("#notice").dataset.state === "offline") notice("ok", "");
    setRedis(hello.redis);
    addEvents(hello.events, false);
    renderTiles();
    renderDetail();
    window.hvLoaded = window.hvLoaded || performance.now();
  });
  source.addEventListener("tick", (m) => {
    state.pictures.clear();  // newer pictures are fetched as the tiles name them
    const tick = JSON.parse(m.data);
    setControl(tick.control);
    takeTiles(tick.cameras);
    // a hidden tab (in the background, minimised) draws nothing and loads no picture (for days, 100 cameras' at
    // every tick); it draws the newest state once shown
    if (!document.hidden) renderTiles();
  });
  source.addEventListener("events", (m) => {
    const msg = JSON.parse(m.data);
    addEvents(msg.events, !msg.backlog);  // the stream's history, read after a Redis outage: not live news
  });
  source.addEventListener("redis", (m) => setRedis(JSON.parse(m.data)));
  source.onerror = () => {
    if (source.readyState !== EventSource.OPEN) {
      notice("offline", "Lost the connection to the dashboard server; reconnecting… Tiles show the last values read.");
      // greyed as when Redis is away (the next hello says how Redis is): with many cameras the notice is out of view,
      // and the tiles of the moment the dashboard went read as live for as long as it stayed away
      document.body.classList.add("frozen");
    }
    // EventSource retries a lost connection, but an HTTP error (a proxy's 502 while the dashboard restarts) ends it
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
  };
}

// --- add and remove cameras (only when the dashboard allows it and a controller listens) -------------------------
function setControl(on) {
  state.control = !!on;
  $("#add-open").hidden = !state.control;
  if (!state.control) $("#add-camera").hidden = true;
}

async function command(method, path, body, output) {
  output.dataset.status = "sending";
  output.textContent = "sending…";
  try {
    const response = await fetch(path, { method, headers: { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body) });
    // a proxy's error page is no JSON: its HTTP status is the reason
    const result = await response.json().catch(() => ({ status: "rejected",
      reason: `HTTP ${response.status} ${response.statusText}`.trim() }));
    output.dataset.status = result.status;
    output.textContent = result.status === "accepted" ? "accepted" : `${result.status}: ${result.reason || ""}`;
    return result;
  } catch (err) {
    output.dataset.status = "rejected";
    output.textContent = `failed: ${err}`;
    return null;
  }
}

async function addCamera(event) {
  event.preventDefault();
  const field = (name) => event.target.elements.namedItem(name);
  const camera = { id: field("id").value.trim(), url: field("url").value.trim() };
  if (field("fps").value) camera.fps = Number(field("fps").value);
  const heads = field("heads").value.split(",").map((h) => h.trim()).filter(Boolean);
  if (heads.length) camera.heads = heads;
  const result = await command("POST", "api/cameras", camera, $("#control-result"));
  if (result && result.status === "accepted") field("url").value = "";  // it may hold a password
}

function removeCamera(camera, output) {
  // what the service's removal does (pipeline/live_control.py): it deletes the camera's status, latest picture and
  // zone/line counts; its detections stream and its events stay in Redis
  if (!confirm(`Remove camera ${iso(camera)}? Its pipeline stops, and its status, latest picture and zone/line counts `
    + "are deleted from Redis; its detections stream and its events stay.")) return;
  command("DELETE", dotted(camera) ? `api/cameras?camera=${encodeURIComponent(camera)}`
    : `api/cameras/${encodeURIComponent(camera)}`, undefined, output);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#add-open").addEventListener("click", () => { $("#add-camera").hidden = false; $("#add-camera").elements.namedItem("id").focus(); });
  $("#add-cancel").addEventListener("click", () => { $("#add-camera").hidden = true; });
  $("#add-camera").addEventListener("submit", addCamera);
  $("#filter-camera").addEventListener("change", applyFilters);
  $("#filter-types").addEventListener("change", applyFilters);
  window.addEventListener("hashchange", () => { renderDetail(); if (!currentDetail()) renderTiles(); });
  window.addEventListener("resize", renderTiles);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) renderTiles(); });
  renderDetail();
  connect();
});
