// The search page: text, dropped or picked files, and "more like this" on click, over /api/search.
"use strict";

const form = document.getElementById("search");
const query = document.getElementById("query");
const drop = document.getElementById("drop");
const picker = document.getElementById("file");
const chip = document.getElementById("upload");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
let upload = null;  // the dropped or picked File, searched with the text
let latest = 0;  // the newest search; replies to older ones are dropped

function target() {
  return form.querySelector("input[name=target]:checked").value;
}

function setUpload(file) {
  upload = file;
  chip.hidden = !file;
  chip.textContent = file ? file.name : "";
}

async function search(extra = {}, targetOverride = null) {
  const body = new FormData();
  if (query.value.trim()) body.append("q", query.value.trim());
  // the form field is the file's kind: image, audio or video
  if (upload) body.append(["audio", "video"].includes(upload.type.split("/")[0]) ? upload.type.split("/")[0] : "image", upload, upload.name);
  for (const [key, value] of Object.entries(extra)) body.append(key, value);
  if (![...body.keys()].length) return;
  body.append("target", targetOverride || target());
  body.append("k", document.getElementById("k").value || "24");
  if (document.getElementById("dedup")?.checked) body.append("dedup", "true");
  statusLine.textContent = "searching…";
  const started = performance.now();
  const mine = ++latest;
  try {
    const response = await fetch("/api/search", { method: "POST", body });
    const data = await response.json();
    if (mine !== latest) return;
    if (!response.ok) throw new Error(describe(data.detail));
    const count = `${data.length} result${data.length === 1 ? "" : "s"}`;
    statusLine.textContent = `${count} in ${Math.round(performance.now() - started)} ms`;
    results.replaceChildren(...data.map(card));
  } catch (error) {
    if (mine !== latest) return;
    statusLine.textContent = `error: ${error.message}`;
    results.replaceChildren();
  }
}

// FastAPI reports a bad field as a list of {loc, msg}; the engine's own errors are one line.
function describe(detail) {
  if (Array.isArray(detail)) return detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("; ");
  return String(detail);
}

function card(hit) {
  const element = document.createElement("article");
  element.className = "result";
  element.dataset.id = hit.id;
  element.title = "Search for more like this";
  const name = (hit.metadata.image || hit.path || hit.uri).split("/").pop();
  if (hit.modality === "image" || hit.metadata.image) {
    const image = document.createElement("img");
    image.loading = "lazy";
    image.alt = hit.text || name;
    image.src = `/api/items/${hit.id}/thumbnail?size=256`;
    element.append(image);
  } else if (hit.modality === "text") {
    element.classList.add("text-only");
  }
  const body = document.createElement("div");
  body.className = "body";
  if (hit.modality === "audio" || hit.modality === "video") {
    // a media fragment starts the player at the best window or segment
    const player = document.createElement(hit.modality);
    player.controls = true;
    player.preload = "metadata";
    player.src = `/api/items/${hit.id}/file#t=${hit.metadata.start},${hit.metadata.end}`;
    player.addEventListener("click", (event) => event.stopPropagation());
    body.append(player);
  }
  if (hit.text) {
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = hit.text;
    body.append(text);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const label = document.createElement("span");
  label.className = "name";
  const timed = hit.modality === "audio" || hit.modality === "video";
  label.textContent = timed ? `${name} ${hit.metadata.start}–${hit.metadata.end} s` : name;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  meta.append(label, score);
  if (hit.duplicates && hit.duplicates.length) {
    // a deduplicated search: this hit stands for near-duplicates, listed on demand
    const others = document.createElement("details");
    others.className = "duplicates";
    others.addEventListener("click", (event) => event.stopPropagation());
    const summary = document.createElement("summary");
    summary.textContent = `+${hit.duplicates.length} near-duplicate${hit.duplicates.length === 1 ? "" : "s"}`;
    others.append(summary, ...hit.duplicates.map((d) => {
      const line = document.createElement("div");
      line.textContent = `${(d.path || d.uri).split("/").pop()} ${d.score.toFixed(3)}`;
      return line;
    }));
    meta.append(others);
  }
  body.append(meta);
  element.append(body);
  element.addEventListener("click", () => {
    query.value = "";
    setUpload(null);
    // "auto" would answer an image with captions; more like this means more of the same kind
    search({ like: hit.id }, target() === "auto" ? hit.modality : null);
  });
  return element;
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});
for (const radio of form.querySelectorAll("input[name=target]")) radio.addEventListener("change", () => search());
picker.addEventListener("change", () => {
  setUpload(picker.files[0] || null);
  search();
});
chip.addEventListener("click", () => setUpload(null));
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", (event) => {
  if (!drop.contains(event.relatedTarget)) drop.classList.remove("over");  // not when over a child
});
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) {
    setUpload(file);
    search();
  }
});

fetch("/api/stats").then((response) => response.json()).then((stats) => {
  const counts = Object.entries(stats.counts).filter(([, count]) => count).map(([kind, count]) => `${count} ${kind}`);
  document.getElementById("stats").textContent = counts.join(" · ");
});
