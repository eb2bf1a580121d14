// The search page over /api/search: text, an uploaded (picked, dropped or pasted) file, filters,
// a full-size view of each result with "more like this", load-more, and the search in the URL.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search");
const query = $("query");
const drop = $("drop");
const picker = $("file");
const statusLine = $("status");
const results = $("results");
const loadMore = $("load-more");
const viewer = $("viewer");
const DEFAULT_K = 24;
const MAX_K = 1000;  // the API's largest k; load-more asks for more of the same search
const TOKEN_KEY = "retrieval-token";
const FILTER_FIELDS = { under: "f-under", from: "f-from", to: "f-to", text: "f-text", filter: "f-extra" };

let upload = null;  // the uploaded File, searched with the text
let uploadUrl = null;  // its object URL, for the preview
const uploads = new Map();  // history entry -> its File (a File cannot live in the URL)
let current = null;  // the search on screen: its parameters, pages loaded and hits
let latest = 0;  // the newest request; replies to older ones are dropped
let viewing = -1;  // the hit shown in the full-size view
let opener = null;  // what had focus before the view opened

// -- access token: `#token=...` in the link, or asked for on a 401; kept for this tab only --------

function takeTokenFromLink() {
  const match = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (!match) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  history.replaceState(history.state, "", location.pathname + location.search);  // never shared by a copied link
}

function authorization() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

let tokenPrompt = null;
function askForToken() {
  if (!tokenPrompt) {
    const dialog = $("token-dialog");
    tokenPrompt = new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        tokenPrompt = null;
        const token = $("token-input").value.trim();
        if (dialog.returnValue === "ok" && token) sessionStorage.setItem(TOKEN_KEY, token);
        resolve(dialog.returnValue === "ok" && Boolean(token));
      }, { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }
  return tokenPrompt;
}

async function api(url, options = {}) {
  for (;;) {
    const response = await fetch(url, { ...options, headers: { ...authorization(), ...options.headers } });
    if (response.status !== 401 || !(await askForToken())) return response;
  }
}

// Images and players cannot send a header: with a token their files come through fetch as blobs.
async function setSource(element, url, fragment = "") {
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    element.src = url + fragment;
    return element.src;
  }
  const response = await api(url);
  if (!response.ok) return "";
  element.src = URL.createObjectURL(await response.blob()) + fragment;
  return element.src;
}

// -- the search's parameters, the form and the URL ----------------------------------------------------

function readForm() {
  const params = { q: query.value.trim(), target: form.querySelector("input[name=target]:checked").value,
                   k: clampK($("k").value), dedup: $("dedup").checked ? "1" : "" };
  for (const [name, id] of Object.entries(FILTER_FIELDS)) params[name] = $(id).value.trim();
  return params;
}

function fillForm(params) {
  query.value = params.q || "";
  const radio = form.querySelector(`input[name=target][value="${CSS.escape(params.target || "auto")}"]`);
  (radio || form.querySelector("input[name=target][value=auto]")).checked = true;
  $("k").value = params.k || DEFAULT_K;
  $("dedup").checked = Boolean(params.dedup);
  for (const [name, id] of Object.entries(FILTER_FIELDS)) $(id).value = params[name] || "";
  if (params.dedup || Object.keys(FILTER_FIELDS).some((name) => params[name])) $("filters").open = true;
  showFilter();
}

function clampK(value) {
  const k = Number.parseInt(value, 10);
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), 200) : DEFAULT_K;
}

function fromUrl() {
  const url = new URLSearchParams(location.search);
  const params = { target: url.get("target") || "auto", k: clampK(url.get("k") || DEFAULT_K) };
  for (const name of ["q", "like", "dedup", ...Object.keys(FILTER_FIELDS)]) params[name] = url.get(name) || "";
  return params;
}

function toUrl(params) {
  const url = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (name === "target" && value === "auto") continue;
    if (name === "k" && Number(value) === DEFAULT_K) continue;
    if (value !== "" && value != null) url.set(name, value);
  }
  const text = url.toString();
  return text ? `?${text}` : location.pathname;
}

// A value as one term of the filter language: quoted when it holds spaces or quotes.
function term(field, value) {
  return /[\s"]/.test(value) ? `${field}:"${value.replace(/"/g, "")}"` : `${field}:${value}`;
}

// The page's filters in the filter language (README: Filters); "more terms" are passed as typed.
function composeFilter(params) {
  const terms = [];
  if (params.target && params.target !== "auto") terms.push(`modality:${params.target}`);
  if (params.under) terms.push(term("under", params.under));
  if (params.from) terms.push(`mtime>=${params.from}`);
  if (params.to) terms.push(`mtime<=${params.to}`);  // a bare date is the whole day
  if (params.text) terms.push(term("text", params.text));
  if (params.filter) terms.push(params.filter);
  return terms.join(" ");
}

function showFilter() {
  const params = readForm();
  $("filter-text").textContent = composeFilter(params) || "none";
  const count = Object.keys(FILTER_FIELDS).filter((name) => params[name]).length;
  $("filter-count").textContent = count ? `(${count} set)` : "";
}

// -- searching -----------------------------------------------------------------------------------------

function searchable(params) {
  return Boolean(params.q || params.like || upload);
}

// A new search from the form (or from "more like this"): a new history entry, then the results.
function newSearch(params) {
  if (!searchable(params)) return;
  const key = upload ? String(Date.now()) : null;
  if (key) uploads.set(key, upload);
  const url = toUrl(params);
  if (url === location.pathname + location.search && !upload) history.replaceState({ upload: key }, "", url);
  else history.pushState({ upload: key }, "", url);
  run(params);
}

async function run(params, pages = 1) {
  const body = new FormData();
  if (params.q) body.append("q", params.q);
  if (params.like) body.append("like", params.like);
  if (upload) body.append(kindOf(upload), upload, upload.name);
  body.append("target", params.target);
  const wanted = Math.min(params.k * pages, MAX_K);
  body.append("k", wanted);
  const filter = composeFilter(params);
  if (filter) body.append("filter", filter);
  if (params.dedup) body.append("dedup", "true");

  const mine = ++latest;
  statusLine.textContent = "searching…";
  loadMore.disabled = true;
  const started = performance.now();
  try {
    const response = await api("/api/search", { method: "POST", body });
    const data = await response.json();
    if (mine !== latest) return;
    if (!response.ok) throw new Error(describe(data.detail));
    const more = pages > 1 && current ? current.hits : [];
    const seen = new Set(more.map((hit) => hit.id));
    const added = data.filter((hit) => !seen.has(hit.id));
    const hits = [...more, ...added];
    if (pages > 1) results.append(...added.map((hit, i) => card(hit, more.length + i)));
    else results.replaceChildren(...hits.map(card));
    current = { params, pages, hits };
    const count = `${hits.length} result${hits.length === 1 ? "" : "s"}`;
    statusLine.textContent = `${count} in ${Math.round(performance.now() - started)} ms`;
    loadMore.hidden = data.length < wanted || wanted >= MAX_K;
  } catch (error) {
    if (mine !== latest) return;
    statusLine.textContent = `error: ${error.message}`;
    results.replaceChildren();
    current = null;
    loadMore.hidden = true;
  } finally {
    if (mine === latest) loadMore.disabled = false;
  }
}

function kindOf(file) {
  const kind = (file.type || "").split("/")[0];
  return ["audio", "video"].includes(kind) ? kind : "image";  // the form field is the file's kind
}

// FastAPI reports a bad field as a list of {loc, msg}; the engine's own errors are one line.
function describe(detail) {
  if (Array.isArray(detail)) return detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("; ");
  return String(detail);
}

// -- results -------------------------------------------------------------------------------------------

function nameOf(hit) {
  return (hit.metadata.image || hit.path || hit.uri).split("/").pop();
}

function timed(hit) {
  return hit.modality === "audio" || hit.modality === "video";
}

function label(hit) {
  return timed(hit) ? `${nameOf(hit)} ${hit.metadata.start}–${hit.metadata.end} s` : nameOf(hit);
}

function isGenerated(item) {
  return Boolean(item && (item.generated || (item.metadata && item.metadata.generated)));
}

function badge(text, model) {
  const element = document.createElement("span");
  element.className = "badge";
  element.textContent = text;
  element.title = `caption written by ${model || "a caption model"}`;
  return element;
}

function span(className, text) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

function card(hit, position) {
  const element = document.createElement("article");
  element.className = `result ${hit.modality}`;
  element.dataset.id = hit.id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.title = "Show full size, every caption and more like this";
  if (hit.modality === "image" || hit.metadata.image) {
    const image = document.createElement("img");
    image.loading = "lazy";
    image.alt = hit.text || nameOf(hit);
    // the card takes the thumbnail's shape, so rows line up without bars or crops
    image.addEventListener("load", () => {
      if (image.naturalHeight) element.style.setProperty("--r", (image.naturalWidth / image.naturalHeight).toFixed(3));
    });
    setSource(image, `/api/items/${hit.id}/thumbnail?size=256`);
    open.append(image);
  } else if (timed(hit)) {
    // a media fragment starts the player at the best window or segment
    const player = document.createElement(hit.modality);
    player.controls = true;
    player.preload = "metadata";
    player.setAttribute("aria-label", `Play ${label(hit)}`);
    setSource(player, `/api/items/${hit.id}/file`, `#t=${hit.metadata.start},${hit.metadata.end}`);
    element.append(player);
  }
  const body = span("body", "");
  if (hit.text) {
    const text = span("text", hit.text);
    body.append(text);
    // written by a caption model, not a person: say so, and which model
    if (isGenerated(hit)) body.append(badge("generated", hit.metadata.caption_model));
  }
  const meta = span("meta", "");
  meta.append(span("name", label(hit)), span("score", hit.score.toFixed(3)));
  body.append(meta);
  open.append(body);
  open.addEventListener("click", () => openViewer(position));
  element.append(open);
  if (hit.duplicates && hit.duplicates.length) {
    // a deduplicated search: this hit stands for near-duplicates, listed on demand
    const others = document.createElement("details");
    others.className = "duplicates";
    const summary = document.createElement("summary");
    summary.textContent = `+${hit.duplicates.length} near-duplicate${hit.duplicates.length === 1 ? "" : "s"}`;
    others.append(summary, ...duplicateLines(hit, "div"));
    element.append(others);
  }
  return element;
}

function duplicateLines(hit, tag) {
  return (hit.duplicates || []).map((duplicate) => {
    const line = document.createElement(tag);
    line.textContent = `${(duplicate.path || duplicate.uri).split("/").pop()} ${duplicate.score.toFixed(3)}`;
    return line;
  });
}

// -- the full-size view --------------------------------------------------------------------------------

async function openViewer(position) {
  if (!current || position < 0 || position >= current.hits.length) return;
  viewing = position;
  const hit = current.hits[position];
  if (!viewer.open) {
    opener = document.activeElement;
    viewer.showModal();
  }
  $("viewer-title").textContent = label(hit);
  $("viewer-score").textContent = hit.score.toFixed(3);
  $("viewer-kind").textContent = hit.metadata.image ? "caption of an image" : hit.modality;
  $("viewer-path").textContent = hit.path || hit.uri;
  $("viewer-prev").disabled = position === 0;
  $("viewer-next").disabled = position === current.hits.length - 1;
  const media = $("viewer-media");
  media.replaceChildren();
  const link = $("viewer-file");
  link.hidden = true;
  let element = null;
  let fragment = "";
  let url = `/api/items/${hit.id}/file`;
  if (hit.modality === "image") {
    element = document.createElement("img");
    element.alt = hit.text || nameOf(hit);
  } else if (hit.metadata.image) {
    element = document.createElement("img");
    element.alt = `The image this caption belongs to: ${nameOf(hit)}`;
    url = `/api/items/${hit.id}/thumbnail?size=1024`;
  } else if (timed(hit)) {
    element = document.createElement(hit.modality);
    element.controls = true;
    element.setAttribute("aria-label", `Play ${label(hit)}`);
    fragment = `#t=${hit.metadata.start},${hit.metadata.end}`;
  }
  media.hidden = !element;
  if (element) {
    media.append(element);
    setSource(element, url, fragment).then((source) => {
      if (source && !hit.metadata.image) {
        link.href = source;
        link.hidden = false;
      }
    });
  }
  showFileFacts(null);
  const duplicates = duplicateLines(hit, "li");
  $("viewer-duplicates").hidden = !duplicates.length;
  $("viewer-duplicates").querySelector("ul").replaceChildren(...duplicates);
  showCaptions([hit.text ? { text: hit.text, generated: isGenerated(hit), model: hit.metadata.caption_model } : null]
    .filter(Boolean),
               hit.modality === "text" && !hit.metadata.image ? "Text" : "Captions");
  try {
    const response = await api(`/api/items/${hit.id}`);
    const item = response.ok ? await response.json() : null;
    if (viewing !== position || !item) return;
    showFileFacts(item);
    if (!Array.isArray(item.captions)) return;
    const captions = item.captions.map((caption) => (typeof caption === "string" ? { text: caption } : caption));
    showCaptions(captions.length ? captions : null, "Captions");
  } catch {
    // the view keeps the hit's own text
  }
}

// The file's size and time of change, where the item's details give them.
function showFileFacts(item) {
  const known = Boolean(item && item.size != null && item.mtime != null);
  for (const element of viewer.querySelectorAll(".file-fact")) element.hidden = !known;
  if (!known) return;
  const units = [["GB", 1e9], ["MB", 1e6], ["KB", 1e3]];
  const [unit, size] = units.find(([, size]) => item.size >= size) || ["B", 1];
  $("viewer-size").textContent = `${(item.size / size).toFixed(unit === "B" ? 0 : 1)} ${unit}`;
  $("viewer-mtime").textContent = new Date(item.mtime * 1000).toLocaleString();
}

function showCaptions(captions, heading) {
  const list = $("viewer-captions");
  list.previousElementSibling.textContent = heading;
  if (!captions) return;
  list.replaceChildren(...captions.map((caption) => {
    const entry = document.createElement("li");
    entry.textContent = caption.text;
    if (isGenerated(caption)) entry.append(" ", badge("generated", caption.model || caption.caption_model));
    return entry;
  }));
  if (!captions.length) list.append(Object.assign(document.createElement("li"), { textContent: "none", className: "muted" }));
}

function moreLikeThis() {
  const hit = current.hits[viewing];
  viewer.close();
  query.value = "";
  setUpload(null);
  const params = { ...readForm(), q: "", like: String(hit.id) };
  // "best match" would answer an image with captions; more like this means more of the same kind
  if (params.target === "auto") params.target = hit.modality;
  fillForm(params);
  newSearch(params);
}

viewer.addEventListener("close", () => {
  $("viewer-media").replaceChildren();  // stops a playing sound
  if (opener && document.contains(opener)) opener.focus();
  const focused = results.querySelector(`article:nth-child(${viewing + 1}) .open`);
  if (focused && !document.contains(opener)) focused.focus();
});
viewer.addEventListener("click", (event) => {
  if (event.target === viewer) viewer.close();  // a click on the backdrop
});
viewer.addEventListener("keydown", (event) => {
  if (["AUDIO", "VIDEO", "INPUT"].includes(event.target.tagName)) return;  // their arrows seek
  const step = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
  if (!step) return;
  event.preventDefault();
  openViewer(viewing + step);
  const card = results.querySelector(`article:nth-child(${viewing + 1}) .open`);
  if (card) opener = card;
});
$("viewer-close").addEventListener("click", () => viewer.close());
$("viewer-prev").addEventListener("click", () => openViewer(viewing - 1));
$("viewer-next").addEventListener("click", () => openViewer(viewing + 1));
$("viewer-like").addEventListener("click", moreLikeThis);

// -- uploads: picker, drag and drop, paste ------------------------------------------------------------

function setUpload(file) {
  upload = file;
  if (uploadUrl) URL.revokeObjectURL(uploadUrl);
  uploadUrl = file && kindOf(file) === "image" ? URL.createObjectURL(file) : null;
  const image = $("preview-image");
  image.hidden = !uploadUrl;
  if (uploadUrl) {
    image.src = uploadUrl;
    image.alt = `Uploaded image ${file.name}`;
  } else {
    image.removeAttribute("src");
  }
  $("preview").hidden = !file;
  $("upload").textContent = file ? file.name : "";
  if (!file) picker.value = "";
}

function searchWith(file) {
  setUpload(file);
  newSearch({ ...readForm(), like: "" });
}

picker.addEventListener("change", () => {
  if (picker.files[0]) searchWith(picker.files[0]);
});
$("clear-upload").addEventListener("click", () => {
  setUpload(null);
  query.focus();
});
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
  if (file) searchWith(file);
});
document.addEventListener("paste", (event) => {
  const file = event.clipboardData && [...event.clipboardData.files].find((f) => /^(image|audio|video)\//.test(f.type));
  if (!file) return;  // pasted text goes where it was pasted
  event.preventDefault();
  searchWith(file);
});

// -- the form, the filters and history ----------------------------------------------------------------

form.addEventListener("submit", (event) => {
  event.preventDefault();
  newSearch({ ...readForm(), like: "" });
});
form.addEventListener("input", showFilter);
for (const radio of form.querySelectorAll("input[name=target]")) {
  radio.addEventListener("change", () => newSearch({ ...readForm(), like: current ? current.params.like : "" }));
}
for (const id of ["f-from", "f-to", "dedup"]) $(id).addEventListener("change", () => newSearch({ ...readForm(), like: "" }));
loadMore.addEventListener("click", () => {
  if (current) run(current.params, current.pages + 1);
});

function restore() {
  const params = fromUrl();
  fillForm(params);
  setUpload((history.state && uploads.get(history.state.upload)) || null);
  if (viewer.open) viewer.close();
  if (searchable(params)) {
    run(params);
  } else {
    latest++;
    current = null;
    results.replaceChildren();
    statusLine.textContent = "";
    loadMore.hidden = true;
  }
}

window.addEventListener("popstate", restore);
takeTokenFromLink();
restore();

// Each modality's count with its noun: "1 image", "504 texts", "9 sounds".
const NOUNS = {image: ["image", "images"], text: ["text", "texts"], audio: ["sound", "sounds"],
               video: ["video", "videos"]};

function counted(count, kind) {
  const [one, many] = NOUNS[kind] || [kind, kind];
  return `${count} ${count === 1 ? one : many}`;
}

api("/api/stats").then((response) => (response.ok ? response.json() : null)).then((stats) => {
  if (!stats) return;
  const counts = Object.entries(stats.counts).filter(([, count]) => count).map(([kind, count]) => counted(count, kind));
  $("stats").textContent = counts.join(" · ");
});
