// The map page's script (served at /static/map.js: the Content-Security-Policy allows no inline script).
//
// Every point is drawn on one <canvas>, batched into one path per colour, so 100k points cost one
// redraw of a few tens of milliseconds and no DOM node each. Hover and click find the nearest point
// through a uniform grid over the unit square (only the cells under the cursor are looked at), and a
// box selection is one pass over the points' screen positions.
"use strict";
const $ = (id) => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d"), stage = $("stage");
const results = $("results"), errorBox = $("error"), statusBox = $("status");
// matplotlib's tab20 order: tab10's ten, then their light twins.
const CATEGORICAL = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
  "#dbdb8d", "#9edae5"];
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const MISSING = "#c0c4c8", BINS = 32, HIT_PX = 6;
let metric = "cosine";
let pts = null;         // the /map/points answer, with typed arrays
let colourOf = null;    // Int32Array: each point's colour slot
let palette = [];       // slot -> CSS colour
let buckets = [];       // slot -> Int32Array of point indices (one fill per colour)
let values = null;      // the numeric column shown, by row id (null: colour by label)
let grid = null;        // {size, start: Int32Array, items: Int32Array}
let selected = new Int32Array(0), rings = [];
const view = { scale: 1, ox: 0, oy: 0 };
const timings = {};

function apiError(response) {
  return response.json().then((b) => (typeof b.detail === "string" ? b.detail : `${response.status}`),
    () => `${response.status} ${response.statusText}`);
}

// ---------------------------------------------------------------- geometry

function sx(i) { return view.ox + pts.x[i] * view.scale; }
function sy(i) { return view.oy + (1 - pts.y[i]) * view.scale; }

function fitView() {
  const w = canvas.clientWidth, h = canvas.clientHeight, margin = 14;
  view.scale = Math.max(1, Math.min(w, h) - 2 * margin);
  view.ox = (w - view.scale) / 2;
  view.oy = (h - view.scale) / 2;
}

function resize() {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(canvas.clientWidth * dpr);
  canvas.height = Math.round(canvas.clientHeight * dpr);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);  // draw in CSS pixels
}

function buildGrid() {
  const n = pts.count, size = Math.max(1, Math.min(512, Math.ceil(Math.sqrt(n / 2))));
  const cell = new Int32Array(n), start = new Int32Array(size * size + 1), items = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const cx = Math.min(size - 1, Math.floor(pts.x[i] * size)), cy = Math.min(size - 1, Math.floor(pts.y[i] * size));
    cell[i] = cy * size + cx;
    start[cell[i] + 1]++;
  }
  for (let c = 0; c < size * size; c++) start[c + 1] += start[c];
  const fill = start.slice(0, size * size);
  for (let i = 0; i < n; i++) items[fill[cell[i]]++] = i;
  grid = { size, start, items };
}

// The point nearest to (mx, my) in CSS pixels, within HIT_PX; -1 if none.
function nearest(mx, my) {
  const g = grid.size, r = HIT_PX / view.scale;
  const dx = (mx - view.ox) / view.scale, dy = 1 - (my - view.oy) / view.scale;
  const clamp = (v) => Math.max(0, Math.min(g - 1, v));
  const x0 = clamp(Math.floor((dx - r) * g)), x1 = clamp(Math.floor((dx + r) * g));
  const y0 = clamp(Math.floor((dy - r) * g)), y1 = clamp(Math.floor((dy + r) * g));
  if (dx + r < 0 || dx - r > 1 || dy + r < 0 || dy - r > 1) return -1;
  let best = -1, bestD = HIT_PX * HIT_PX;
  for (let cy = y0; cy <= y1; cy++) {
    for (let c = cy * g + x0; c <= cy * g + x1; c++) {
      for (let k = grid.start[c]; k < grid.start[c + 1]; k++) {
        const i = grid.items[k], ex = sx(i) - mx, ey = sy(i) - my, d = ex * ex + ey * ey;
        if (d <= bestD) { bestD = d; best = i; }
      }
    }
  }
  return best;
}

// ---------------------------------------------------------------- colours and drawing

function viridis(t) {
  const f = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(f));
  const c = VIRIDIS[i].map((v, j) => Math.round(v + (VIRIDIS[i + 1][j] - v) * (f - i)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function assignColours() {
  const n = pts.count;
  colourOf = new Int32Array(n);
  let lo = Infinity, hi = -Infinity;
  if (values) {
    for (let i = 0; i < n; i++) { const v = values[pts.id[i]]; if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }
    palette = [...Array.from({ length: BINS }, (_, b) => viridis(b / (BINS - 1))), MISSING];
    for (let i = 0; i < n; i++) {
      const v = values[pts.id[i]];
      colourOf[i] = v === null ? BINS : (hi > lo ? Math.min(BINS - 1, Math.floor((v - lo) / (hi - lo) * BINS)) : 0);
    }
  } else {
    const m = pts.classes.length;
    palette = [...pts.classes.map((_, c) => CATEGORICAL[c % CATEGORICAL.length]), MISSING];
    for (let i = 0; i < n; i++) colourOf[i] = pts.label[i] >= 0 ? pts.label[i] : m;
  }
  const counts = new Int32Array(palette.length);
  for (let i = 0; i < n; i++) counts[colourOf[i]]++;
  buckets = Array.from(counts, (c) => new Int32Array(c));
  const fill = new Int32Array(palette.length);
  for (let i = 0; i < n; i++) buckets[colourOf[i]][fill[colourOf[i]]++] = i;
  legend(counts, lo, hi);
}

function legend(counts, lo, hi) {
  const box = $("legend");
  box.replaceChildren();
  const item = (colour, text) => {
    const span = document.createElement("span"), sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = colour;
    span.append(sw, text);
    box.append(span);
  };
  if (values) {
    item(viridis(0), `${$("color").value} ${lo === Infinity ? "–" : lo.toPrecision(4)}`);
    item(viridis(1), `${hi === -Infinity ? "–" : hi.toPrecision(4)}`);
  } else if (pts.classes.length <= 40) {
    pts.classes.forEach((c, i) => item(palette[i], `${c} (${counts[i]})`));
  }
  if (counts[palette.length - 1]) item(MISSING, `${values ? "missing" : "unlabelled"} (${counts[palette.length - 1]})`);
}

function draw() {
  const t0 = performance.now(), w = canvas.clientWidth, h = canvas.clientHeight;
  const size = pts.count > 20000 ? 2 : pts.count > 2000 ? 3 : 5, half = size / 2;
  ctx.clearRect(0, 0, w, h);
  let drawn = 0;
  buckets.forEach((members, slot) => {
    ctx.beginPath();
    for (const i of members) {
      const x = sx(i), y = sy(i);
      if (x < -size || y < -size || x > w + size || y > h + size) continue;
      ctx.rect(x - half, y - half, size, size);
      drawn++;
    }
    ctx.fillStyle = palette[slot];
    ctx.fill();
  });
  ctx.lineWidth = 1.5;
  ctx.strokeStyle = "#1d2125";
  ctx.beginPath();
  for (const i of selected) ctx.rect(sx(i) - half - 1, sy(i) - half - 1, size + 2, size + 2);
  ctx.stroke();
  rings.forEach((i, rank) => {
    ctx.beginPath();
    ctx.arc(sx(i), sy(i), rank === 0 ? 9 : 6, 0, 2 * Math.PI);
    ctx.strokeStyle = rank === 0 ? "#b3261e" : "#2f6fd6";
    ctx.stroke();
  });
  canvas.dataset.drawn = String(drawn);
  timings.draw_ms = performance.now() - t0;
}

let pending = false;
function redraw() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => { pending = false; draw(); });
}

// ---------------------------------------------------------------- hover, click, selection

function local(e) {
  const r = canvas.getBoundingClientRect();
  return [e.clientX - r.left, e.clientY - r.top];
}

let hovered = -1;
function hover(mx, my) {
  const i = nearest(mx, my), box = $("hover");
  if (i < 0) { box.hidden = true; hovered = -1; return; }
  if (i !== hovered) {
    hovered = i;
    $("hover-img").src = `/thumbnail/${pts.id[i]}`;
    $("hover-path").textContent = pts.path[i];
    $("hover-label").textContent = pts.label[i] >= 0 ? pts.classes[pts.label[i]] : "";
    const v = values ? values[pts.id[i]] : undefined;
    $("hover-value").textContent = values ? `${$("color").value} ${v === null ? "missing" : v}` : "";
  }
  box.hidden = false;
  const w = stage.clientWidth, h = stage.clientHeight;
  box.style.left = `${mx + 14 + box.offsetWidth > w ? mx - 14 - box.offsetWidth : mx + 14}px`;
  box.style.top = `${Math.max(0, Math.min(h - box.offsetHeight, my + 14))}px`;
}

function selectBox(x0, y0, x1, y1) {
  const [left, right] = [Math.min(x0, x1), Math.max(x0, x1)], [top, bottom] = [Math.min(y0, y1), Math.max(y0, y1)];
  const inside = [];
  for (let i = 0; i < pts.count; i++) {
    const x = sx(i), y = sy(i);
    if (x >= left && x <= right && y >= top && y <= bottom) inside.push(i);
  }
  selected = Int32Array.from(inside);
  $("selection").value = inside.map((i) => pts.path[i]).join("\n");
  $("selection-count").textContent = `${inside.length} image${inside.length === 1 ? "" : "s"}`;
  redraw();
}

let drag = null;
canvas.addEventListener("mousedown", (e) => {
  if (!pts) return;
  e.preventDefault();
  const [x, y] = local(e);
  drag = { x0: x, y0: y, x, y, pan: e.shiftKey || e.button === 1, ox: view.ox, oy: view.oy };
  canvas.classList.toggle("panning", drag.pan);
});
window.addEventListener("mousemove", (e) => {
  if (!pts) return;
  const [x, y] = local(e);
  if (!drag) { hover(x, y); return; }
  drag.x = x;
  drag.y = y;
  $("hover").hidden = true;
  if (drag.pan) {
    view.ox = drag.ox + x - drag.x0;
    view.oy = drag.oy + y - drag.y0;
    redraw();
    return;
  }
  const box = $("box");
  box.hidden = false;
  box.style.left = `${Math.min(drag.x0, x)}px`;
  box.style.top = `${Math.min(drag.y0, y)}px`;
  box.style.width = `${Math.abs(x - drag.x0)}px`;
  box.style.height = `${Math.abs(y - drag.y0)}px`;
});
window.addEventListener("mouseup", (e) => {
  if (!drag) return;
  const d = drag, [x, y] = local(e);
  drag = null;
  canvas.classList.remove("panning");
  $("box").hidden = true;
  if (Math.hypot(x - d.x0, y - d.y0) < 4) {  // a click, not a drag
    const i = nearest(x, y);
    if (i >= 0) searchById(pts.id[i]);
  } else if (!d.pan) {
    selectBox(d.x0, d.y0, x, y);
  }
});
canvas.addEventListener("mouseleave", () => { if (!drag) $("hover").hidden = true; });
canvas.addEventListener("wheel", (e) => {
  if (!pts) return;
  e.preventDefault();
  const [x, y] = local(e), f = Math.exp(-e.deltaY * 0.0015);
  view.ox = x - (x - view.ox) * f;
  view.oy = y - (y - view.oy) * f;
  view.scale *= f;
  redraw();
}, { passive: false });
$("reset").addEventListener("click", () => { fitView(); redraw(); });
window.addEventListener("resize", () => { if (pts) { resize(); fitView(); redraw(); } });
$("copy").addEventListener("click", () => {
  const text = $("selection").value;
  const fallback = () => { $("selection").select(); document.execCommand("copy"); };
  if (navigator.clipboard) navigator.clipboard.writeText(text).catch(fallback); else fallback();
});

// ---------------------------------------------------------------- search results (as on the search page)

function card(hit) {
  const el = document.createElement("div");
  el.className = "hit";
  el.dataset.id = hit.id;
  el.dataset.path = hit.path;
  el.title = "Click: find images like this one";
  const box = document.createElement("div"), img = document.createElement("img");
  box.className = "thumb";
  img.src = hit.thumbnail;
  img.alt = hit.path;
  img.loading = "lazy";
  box.append(img);
  const meta = document.createElement("div"), rank = document.createElement("span"), score = document.createElement("span");
  meta.className = "meta";
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;
  score.className = "score";
  score.textContent = hit.score === null ? "–" : (metric === "cosine" ? `cos ${hit.score.toFixed(3)}` : `d² ${hit.score.toPrecision(4)}`);
  meta.append(rank, score);
  const label = document.createElement("div"), path = document.createElement("div");
  label.className = "label";
  label.textContent = hit.label ?? "";
  path.className = "path";
  path.textContent = hit.path;
  el.append(box, meta, label, path);
  el.addEventListener("click", () => searchById(hit.id));
  return el;
}

let indexOfId = null;  // row id -> point index (-1: not on the map)
async function searchById(id) {
  errorBox.textContent = "";
  statusBox.textContent = `searching image #${id}…`;
  const k = $("k").value.trim();
  try {
    const response = await fetch(`/search/id/${id}${k ? `?k=${encodeURIComponent(k)}` : ""}`);
    if (!response.ok) { results.replaceChildren(); errorBox.textContent = await apiError(response); statusBox.textContent = ""; return; }
    const data = await response.json();
    results.replaceChildren(...data.hits.map(card));
    rings = [id, ...data.hits.map((h) => h.id)].map((r) => indexOfId[r]).filter((i) => i >= 0);
    statusBox.textContent = `${data.hits.length} of image #${id}`;
    redraw();
  } catch (err) {
    errorBox.textContent = `The server could not be reached: ${err.message}`;
    statusBox.textContent = "";
  }
}

// ---------------------------------------------------------------- loading

$("color").addEventListener("change", async () => {
  const name = $("color").value;
  errorBox.textContent = "";
  if (!name) { values = null; } else {
    const response = await fetch(`/map/column?name=${encodeURIComponent(name)}`);
    if (!response.ok) { errorBox.textContent = await apiError(response); return; }
    values = (await response.json()).values;
  }
  assignColours();
  redraw();
});

async function load() {
  const t0 = performance.now();
  const response = await fetch("/map/points");
  if (!response.ok) throw new Error(await apiError(response));
  const data = await response.json();
  timings.fetch_ms = performance.now() - t0;
  pts = { ...data, x: Float32Array.from(data.x), y: Float32Array.from(data.y), id: Int32Array.from(data.id),
          label: Int32Array.from(data.label) };
  indexOfId = new Int32Array(data.rows).fill(-1);
  pts.id.forEach((r, i) => { indexOfId[r] = i; });
  for (const name of data.columns) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("color").append(option);
  }
  const t1 = performance.now();
  buildGrid();
  assignColours();
  timings.index_ms = performance.now() - t1;
  resize();
  fitView();
  draw();
  timings.total_ms = performance.now() - t0;
  const where = data.stored ? `${data.method} map` : `PCA map computed by the server (${data.note})`;
  $("about").textContent = `${data.count} images · ${where}`;
  document.body.dataset.ready = "1";
}

// For tests and benchmarks: where a row is drawn (CSS pixels from the canvas' corner), and timings.
window.embedderMap = {
  screenOf: (id) => (indexOfId && indexOfId[id] >= 0 ? [sx(indexOfId[id]), sy(indexOfId[id])] : null),
  selection: () => Array.from(selected, (i) => pts.id[i]),
  timings,
  // One redraw, its pixels included: reading one back waits for the rasterisation a draw may defer.
  drawNow: () => { const t0 = performance.now(); draw(); ctx.getImageData(0, 0, 1, 1); return performance.now() - t0; },
};

fetch("/health").then((r) => r.json()).then((h) => { metric = h.metric; }).catch(() => {});
load().catch((err) => { $("about").textContent = `The map could not be loaded: ${err.message}`; });
