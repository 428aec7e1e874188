// clipfold's page: plain JavaScript, no framework. It calls the server's JSON endpoints:
// GET /ui/models, POST /v1/models/<name>/classify (multipart), POST /v1/models/<name>/search (JSON
// text, or a raw image body), GET /ui/thumb/<name>?id=<path>. Text goes in with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)} %`);
const num = (x, d = 4) => (x == null ? "–" : Number(x).toFixed(d));

async function call(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function bundleCard(m) {
  const v = m.variant, g = v.gate, p = v.parity;
  const rows = [
    ["model", `${m.model}${m.pretrained ? ` (${m.pretrained.split("/").pop()})` : ""}, ${m.family}, ${m.embed_dim}-d`],
    ["head", m.method],
    ["labels", `${m.labels.length}: ${m.labels.slice(0, 12).join(", ")}${m.labels.length > 12 ? ", …" : ""}`],
    ["variant", `${v.name} (${v.precision}, ${v.format}, ${v.backends.join("/")})`],
    ["variants", m.variants.join(", ")],
  ];
  if (p) rows.push(["parity", `vs open_clip eager on ${p.images} images: top-1 ${pct(p.top1_agreement)}, ` +
                              `cosine min ${num(p.embedding_cosine_min)}`]);
  if (g) rows.push(["gate", `vs ${g.reference} on ${g.images} images: top-1 agreement ${pct(g.top1_agreement)}, ` +
                            `cosine min ${num(g.embedding_cosine_min)}` +
                            (g.accuracy != null ? `, accuracy ${pct(g.accuracy)} (${g.reference} ${pct(g.reference_accuracy)})` : "")]);
  rows.push(["text", m.text ? "yes" : "no"], ["index", m.index ? `${m.index.images} images` : "none"]);
  const dl = el("dl");
  for (const [k, value] of rows) dl.append(el("dt", { text: k }), el("dd", { text: value, "data-field": k }));
  return el("article", { class: "bundle", "data-model": m.name }, el("h3", { text: m.name }), dl);
}

function predictionRows(rows) {
  const box = el("div");
  for (const p of rows) {
    const bar = el("span");
    bar.style.width = `${Math.max(0, Math.min(1, p.score)) * 100}%`;
    box.append(el("div", { class: "prediction" }, el("span", { class: "label", text: p.label, title: p.label }),
                  el("div", { class: "bar" }, bar), el("span", { class: "score", text: p.score.toFixed(3) })));
  }
  return box;
}

async function classify(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/") || f.type === "");
  if (!images.length) return;
  const list = $("predictions");
  const cards = images.map((file) => {
    const models_ = el("div", { class: "models" });
    const card = el("div", { class: "result" }, el("img", { src: URL.createObjectURL(file), alt: file.name }), models_);
    list.prepend(card);
    return models_;
  });
  for (const m of models) {
    const form = new FormData();
    for (const file of images) form.append("image", file, file.name);
    form.append("k", String(Math.min(5, m.max_k)));
    try {
      const answer = await call(`/v1/models/${encodeURIComponent(m.name)}/classify`, { method: "POST", body: form });
      answer.predictions.forEach((rows, i) => cards[i].append(
        el("div", { class: "model-result", "data-model": m.name }, el("h3", { text: m.name }), predictionRows(rows))));
    } catch (err) {
      cards.forEach((c) => c.append(el("p", { class: "error", text: `${m.name}: ${err.message}` })));
    }
  }
}

function showHits(model, answer) {
  const grid = $("hits");
  grid.replaceChildren();
  for (const hit of answer.hits) {
    const src = `/ui/thumb/${encodeURIComponent(model)}?id=${encodeURIComponent(hit.id)}`;
    grid.append(el("figure", { class: "hit", "data-id": hit.id },
      el("img", { src, alt: hit.id, loading: "lazy" }),
      el("figcaption", {}, el("span", { class: "name", text: hit.id, title: hit.id }),
         el("span", { class: "score", text: hit.score.toFixed(3) }))));
  }
  $("search-note").textContent = `${answer.hits.length} best matches` +
    (answer.query_truncated ? " (the text was longer than the model's context and was cut)" : "");
}

async function search(query) {
  const model = $("search-model").value;
  const k = Math.max(1, Math.min(100, parseInt($("search-k").value, 10) || 12));
  const url = `/v1/models/${encodeURIComponent(model)}/search?k=${k}`;
  $("search-note").textContent = "searching…";
  try {
    const options = query instanceof Blob
      ? { method: "POST", body: query, headers: { "Content-Type": query.type || "application/octet-stream" } }
      : { method: "POST", body: JSON.stringify({ text: query, k }), headers: { "Content-Type": "application/json" } };
    showHits(model, await call(url, options));
  } catch (err) {
    $("hits").replaceChildren();
    $("search-note").textContent = "";
    $("search-note").append(el("span", { class: "error", text: err.message }));
  }
}

function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); onFiles(e.dataTransfer.files); });
}

async function main() {
  try {
    models = (await call("/ui/models")).models;
  } catch (err) {
    $("status").textContent = `cannot list the models: ${err.message}`;
    $("status").className = "error";
    return;
  }
  $("status").textContent = `${models.length} model${models.length === 1 ? "" : "s"} served`;
  $("bundles").replaceChildren(...models.map(bundleCard));
  $("file-input").addEventListener("change", (e) => { classify(e.target.files); e.target.value = ""; });
  dropZone($("drop"), classify);

  const indexed = models.filter((m) => m.index);
  if (indexed.length) {
    $("search").hidden = false;
    $("search-model").replaceChildren(...indexed.map((m) => el("option", { value: m.name, text: m.name })));
    const canText = () => models.find((m) => m.name === $("search-model").value)?.text;
    const update = () => { $("search-text").disabled = !canText(); };
    $("search-model").addEventListener("change", update);
    update();
    $("search-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("search-text").value.trim();
      if (text) search(text);
    });
    $("search-image").addEventListener("change", (e) => { if (e.target.files[0]) search(e.target.files[0]); e.target.value = ""; });
    dropZone($("search-image").parentElement, (files) => { if (files[0]) search(files[0]); });
  }
  document.body.dataset.ready = "true";
}

main();
