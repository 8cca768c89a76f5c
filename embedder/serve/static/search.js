// The search page's script (served at /static/search.js: the Content-Security-Policy allows no inline script).
"use strict";
const $ = (id) => document.getElementById(id);
const drop = $("drop"), fileInput = $("file"), results = $("results"), errorBox = $("error"), statusBox = $("status");
let metric = "cosine";

// FastAPI reports errors as {"detail": "..."} or, for validation errors, {"detail": [{msg, loc}, ...]}.
async function apiError(response) {
  let text = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (typeof body.detail === "string") text = body.detail;
    else if (Array.isArray(body.detail)) text = body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  } catch (_) { /* not JSON: keep the status line */ }
  return text;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.classList.toggle("code", message.includes("\n"));  // a filter error's caret line
}
let lastSearch = null;  // the last query, searched again when the filter changes

function render(data) {
  results.replaceChildren();
  for (const hit of data.hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.dataset.path = hit.path;
    card.title = "Click: find images like this one";
    const box = document.createElement("div");
    box.className = "thumb";
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = hit.path;
    img.loading = "lazy";
    box.append(img);
    const meta = document.createElement("div");
    meta.className = "meta";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score === null ? "–" : (metric === "cosine" ? `cos ${hit.score.toFixed(3)}` : `d² ${hit.score.toPrecision(4)}`);
    meta.append(rank, score);
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = hit.label ?? "";
    const path = document.createElement("div");
    path.className = "path";
    path.textContent = hit.path;
    card.append(box, meta, label, path);
    card.addEventListener("click", () => searchById(hit.id));
    results.append(card);
  }
}

async function run(request, what) {
  showError("");
  statusBox.textContent = `Searching ${what}…`;
  const t0 = performance.now();
  try {
    const response = await request();
    if (!response.ok) {
      results.replaceChildren();
      showError(await apiError(response));
      statusBox.textContent = "";
      return;
    }
    const data = await response.json();
    render(data);
    if (!$("k").value) $("k").placeholder = String(data.k);
    statusBox.textContent = `${data.hits.length} neighbours of ${what} in ${Math.round(performance.now() - t0)} ms`;
  } catch (err) {
    results.replaceChildren();
    showError(`The server could not be reached: ${err.message}`);
    statusBox.textContent = "";
  }
}

// An empty box sends no k, so the server's own default applies (shown as the placeholder once known);
// an empty filter box sends no filter. A range (min_score under cosine, max_distance under l2) turns
// the search into a range search, among the rows the filter keeps.
function kQuery() {
  const params = new URLSearchParams();
  const k = $("k").value.trim(), where = $("where").value.trim(), range = $("range").value.trim();
  if (k) params.set("k", k);
  if (where) params.set("where", where);
  if (range) params.set(metric === "cosine" ? "min_score" : "max_distance", range);
  const text = params.toString();
  return text ? `?${text}` : "";
}

function searchFile(file) {
  if (!file) return;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.style.display = "block";
  lastSearch = () => searchFile(file);
  const form = new FormData();
  form.append("file", file, file.name);
  run(() => fetch(`/search/image${kQuery()}`, { method: "POST", body: form }), file.name);
}

function searchById(id) {
  lastSearch = () => searchById(id);
  $("preview").src = `/thumbnail/${id}`;
  $("preview").style.display = "block";
  run(() => fetch(`/search/id/${id}${kQuery()}`), `image #${id}`);
}

for (const box of ["where", "range"]) {
  $(box).addEventListener("keydown", (e) => { if (e.key === "Enter" && lastSearch) { e.preventDefault(); lastSearch(); } });
}
// Cleared after each pick so that choosing the same file again searches again.
fileInput.addEventListener("change", () => { searchFile(fileInput.files[0]); fileInput.value = ""; });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); fileInput.click(); } });
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => searchFile(e.dataTransfer.files[0]));
// A file dropped beside the zone would make the browser navigate away to it.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

fetch("/health").then(async (r) => {
  if (!r.ok) throw new Error(await apiError(r));
  const h = await r.json();
  metric = h.metric;
  if (metric !== "cosine") { $("range-name").textContent = "max distance"; $("range").title = "range search: every image at most this squared L2 distance away"; }
  $("about").textContent = `${h.ntotal} images · ${h.dim}-d features · ${h.kind} index · ${h.metric} · API: /openapi.json`;
}).catch((err) => showError(`Index status unavailable: ${err.message}`));
