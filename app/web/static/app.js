/* The data owner's page: sign in with an API key, upload P and U, follow the audit, read the
 * verdict, download the report, list and delete audits. It talks to the same /v1 API as every
 * other client; the option fields come from the API's own OpenAPI description of the submit form. */
"use strict";

(() => {
  const KEY = "cdi-api-key";
  const FINAL = ["done", "failed", "cancelled"];
  const STAGES = [
    ["queued", "Waiting for a worker"],
    ["validating", "Checking the images"],
    ["extracting", "Computing the features"],
    ["scoring", "Scoring and testing"],
    ["reporting", "Writing the report"],
    ["done", "Done"],
  ];
  const $ = (id) => document.getElementById(id);
  const state = { models: [], sets: { published: null, unpublished: null }, poll: null, audit: null, cursor: null };

  // --- the API --------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function apiKey() { return sessionStorage.getItem(KEY); }

  function unreachable() {
    return new ApiError(0, "unreachable", `The service at ${location.origin} cannot be reached. Is it running? `
      + "Start it with scripts/run (or cdi serve), then reload this page.");
  }

  async function errorOf(response) {
    try {
      const body = await response.json();
      if (body && body.error) return new ApiError(response.status, body.error.code, body.error.message);
    } catch (e) { /* not JSON */ }
    return new ApiError(response.status, `http_${response.status}`, `The service answered ${response.status}.`);
  }

  async function api(method, path, { body, raw } = {}) {
    let response;
    try {
      response = await fetch(path, { method, body, headers: { Authorization: `Bearer ${apiKey()}` } });
    } catch (e) {
      throw unreachable();
    }
    if (!response.ok) {
      const err = await errorOf(response);
      if (response.status === 401) signOut(err.message);
      throw err;
    }
    return raw ? response : response.json();
  }

  /* POST with upload progress (fetch has none). */
  function upload(path, form, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); };
      xhr.onerror = () => reject(unreachable());
      xhr.onload = () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
        if (xhr.status >= 200 && xhr.status < 300) { resolve(body); return; }
        const err = body && body.error
          ? new ApiError(xhr.status, body.error.code, body.error.message)
          : new ApiError(xhr.status, `http_${xhr.status}`, `The service answered ${xhr.status}.`);
        if (xhr.status === 401) signOut(err.message);
        reject(err);
      };
      xhr.send(form);
    });
  }

  // --- small helpers --------------------------------------------------------------------------

  // A p-value for people, as everywhere else (cdi/pvalue.py): three significant digits,
  // Python's "%.3g": 0.0123, 0.5, 1e-06.
  function formatP(p) {
    if (p === null || p === undefined || !Number.isFinite(Number(p))) return "—";
    const x = Number(p);
    if (x === 0) return "0";
    const exp = Math.floor(Math.log10(Math.abs(Number(x.toPrecision(3)))));
    if (exp < -4 || exp >= 3) {
      const [mant, e] = x.toExponential(2).split("e");
      const m = mant.includes(".") ? mant.replace(/0+$/, "").replace(/\.$/, "") : mant;
      const n = Number(e);
      return `${m}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`;
    }
    return String(Number(x.toPrecision(3)));
  }

  function bytes(n) {
    if (!Number.isFinite(n)) return "size unknown";
    const units = ["bytes", "kB", "MB", "GB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  /* The report's texts use <b>, <i>, <code> and XML escapes only: keep those, and text. */
  function markup(target, html) {
    const doc = new DOMParser().parseFromString(`<div>${html}</div>`, "text/html");
    const copy = (from, to) => {
      for (const node of from.childNodes) {
        if (node.nodeType === Node.TEXT_NODE) to.append(node.textContent);
        else if (node.nodeType === Node.ELEMENT_NODE) {
          const tag = node.tagName.toLowerCase();
          const keep = { b: "strong", strong: "strong", i: "em", em: "em", code: "code" }[tag];
          if (keep) { const k = document.createElement(keep); copy(node, k); to.append(k); } else copy(node, to);
        }
      }
    };
    target.replaceChildren();
    copy(doc.body.firstChild, target);
  }

  /* A description from the API's schema: `x` becomes code. */
  function described(target, text) {
    target.replaceChildren(...String(text || "").split("`").map((part, i) => (i % 2 ? el("code", {}, part) : part)));
  }

  function showError(box, err) {
    box.replaceChildren(el("p", {}, err.message));
    if (err.code && err.status) box.append(el("p", { class: "help" }, `Error code: ${err.code} (HTTP ${err.status})`));
    box.hidden = false;
  }

  async function download(path, name, status) {
    status.textContent = "Downloading…";
    try {
      const response = await api("GET", path, { raw: true });
      const url = URL.createObjectURL(await response.blob());
      const a = el("a", { href: url, download: name });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      status.textContent = `Downloaded ${name}.`;
    } catch (err) {
      status.textContent = err.message;
    }
  }

  // --- views ------------------------------------------------------------------------------------

  function show(view) {
    for (const v of ["signin", "new", "audit", "audits"]) $(`view-${v}`).hidden = v !== view;
    $("nav").hidden = view === "signin";
    $("nav-new").toggleAttribute("aria-current", view === "new");
    $("nav-audits").toggleAttribute("aria-current", view === "audits");
    if (view === "new") $("nav-new").setAttribute("aria-current", "page");
    if (view === "audits") $("nav-audits").setAttribute("aria-current", "page");
    const heading = document.querySelector(`#view-${view} h2`);
    if (heading) { heading.tabIndex = -1; heading.focus({ preventScroll: true }); }
  }

  function route() {
    if (state.poll) { clearTimeout(state.poll); state.poll = null; }
    if (!apiKey()) { show("signin"); $("api-key").focus(); return; }
    const hash = location.hash.replace(/^#/, "");
    if (hash.startsWith("audit/")) openAudit(decodeURIComponent(hash.slice(6)));
    else if (hash === "audits") listAudits(true);
    else { show("new"); loadModels(); }
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    if (state.poll) { clearTimeout(state.poll); state.poll = null; }
    show("signin");
    const box = $("signin-error");
    if (message) { box.textContent = message; box.hidden = false; } else box.hidden = true;
  }

  // --- sign in ---------------------------------------------------------------------------------

  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const box = $("signin-error");
    box.hidden = true;
    const key = $("api-key").value.trim();
    if (!key) { box.textContent = "Enter your API key."; box.hidden = false; $("api-key").focus(); return; }
    sessionStorage.setItem(KEY, key);
    try {
      await api("GET", "/v1/audits?limit=1");
    } catch (err) {
      sessionStorage.removeItem(KEY);
      box.textContent = err.status === 401
        ? `${err.message}. Check the key, or ask the service's operator for one (cdi admin create-key).`
        : err.message;
      box.hidden = false;
      $("api-key").focus();
      return;
    }
    $("api-key").value = "";
    state.models = [];
    if (!location.hash || location.hash === "#") location.hash = "#new"; else route();
  });
  $("sign-out").addEventListener("click", () => { location.hash = ""; signOut(); });
  window.addEventListener("hashchange", route);

  // --- the form's options, from the API's description of the submit form --------------------------

  async function loadOptions() {
    let schema;
    try {
      const spec = await (await fetch("/openapi.json")).json();
      schema = spec.paths["/v1/audits"].post.requestBody.content["multipart/form-data"].schema;
      if (schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
    } catch (e) {
      return;
    }
    const props = schema.properties || {};
    const num = (id, p) => {
      const input = $(id);
      if (!p) return;
      if (p.default !== undefined) input.value = p.default;
      const range = [];
      if (p.exclusiveMinimum !== undefined) range.push(`greater than ${p.exclusiveMinimum}`);
      if (p.minimum !== undefined) { input.min = p.minimum; range.push(`at least ${p.minimum}`); }
      if (p.exclusiveMaximum !== undefined) range.push(`less than ${p.exclusiveMaximum}`);
      if (p.maximum !== undefined) { input.max = p.maximum; }
      described($(`${id}-help`), [p.description, range.length ? `Must be ${range.join(" and ")}.` : ""]
        .filter(Boolean).join(" "));
    };
    const choice = (id, p) => {
      const select = $(id);
      if (!p) return;
      const values = p.enum || (p.anyOf || []).flatMap((a) => a.enum || []);
      select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
      if (p.default !== undefined) select.value = p.default;
      described($(`${id}-help`), p.description);
    };
    const flag = (id, p) => {
      if (!p) return;
      $(id).checked = p.default === true;
      described($(`${id}-help`), p.description);
    };
    num("alpha", props.alpha);
    num("seed", props.seed);
    num("looks", props.looks);
    choice("protocol", props.protocol);
    choice("features", props.features);
    choice("precision", props.precision);
    choice("spending", props.spending);
    flag("sequential", props.sequential);
    flag("futility", props.futility);
    if (props.batch_size) described($("batch_size-help"), props.batch_size.description);
  }

  async function loadModels() {
    if (state.models.length) return;
    const select = $("model");
    try {
      state.models = (await api("GET", "/v1/models")).items;
    } catch (err) {
      $("model-help").textContent = err.message;
      return;
    }
    select.replaceChildren(...state.models.map((m) => el("option", { value: m.id }, m.id)));
    const preferred = state.models.find((m) => m.id === "digits-memorised");
    if (preferred) select.value = preferred.id;
    modelChanged();
  }

  function modelChanged() {
    const m = state.models.find((x) => x.id === $("model").value);
    $("model-help").textContent = m ? [m.description, m.family && `(${m.family})`].filter(Boolean).join(" ") : "";
    $("labels-field").hidden = !(m && m.conditioning === "class");
    $("captions-field").hidden = !(m && m.conditioning === "text");
  }
  $("model").addEventListener("change", modelChanged);

  // --- the two sets of images ---------------------------------------------------------------------

  // The service's own rules on uploads (app/uploads.py, GET /v1/upload-rules): the preview
  // refuses exactly what the service would.
  let rulesLoaded = null;
  function loadRules() {
    if (!rulesLoaded) {
      rulesLoaded = fetch("/v1/upload-rules").then(async (r) => {
        if (!r.ok) throw new Error(`the service's upload rules could not be read (HTTP ${r.status})`);
        const rules = await r.json();
        CdiZip.setRules(rules);
        state.rules = rules;
      }).catch((err) => { rulesLoaded = null; throw err; });
    }
    return rulesLoaded;
  }

  async function setFolder(role, files) {
    try {
      await loadRules();
    } catch (err) {
      state.sets[role] = { kind: "folder", images: [], refused: [], skipped: 0, bytes: 0, blocking: true,
        error: err.message };
      preview(role);
      return;
    }
    // Each file's path inside the chosen folder (the folder's own name dropped).
    const entries = files.map((f) => {
      const rel = (f.relPath || f.webkitRelativePath || f.name).split("/");
      return { path: rel.length > 1 ? rel.slice(1).join("/") : rel[0], size: f.size, file: f };
    });
    const sorted = await CdiZip.sniff(CdiZip.sortFiles(entries), (e) => CdiZip.fileHead(e.file));
    state.sets[role] = { kind: "folder", ...sorted, blocking: false,
      bytes: sorted.images.reduce((s, e) => s + e.size, 0) };
    preview(role);
  }

  async function setZip(role, file) {
    try {
      await loadRules();
      const members = await CdiZip.listZip(file);
      const stripped = CdiZip.stripTop(members, role);
      const sorted = await CdiZip.sniff(CdiZip.sortFiles(stripped), (e) => CdiZip.memberHead(file, e));
      for (const m of stripped) if (m.encrypted) sorted.refused.push({ path: m.path, reason: "encrypted" });
      state.sets[role] = { kind: "zip", file, ...sorted, blocking: sorted.refused.length > 0,
        bytes: sorted.images.reduce((s, e) => s + e.size, 0) };
    } catch (err) {
      state.sets[role] = { kind: "zip", file, images: [], refused: [], skipped: 0, bytes: 0, blocking: true,
        error: err.message };
    }
    preview(role);
  }

  function preview(role) {
    const s = state.sets[role];
    const box = $(`${role}-preview`);
    box.replaceChildren();
    if (!s) return;
    if (s.error) { box.append(el("p", { class: "refused" }, s.error)); return; }
    const source = s.kind === "zip" ? `from ${s.file.name}` : "from the folder";
    box.append(el("p", {}, el("span", { class: "count" }, `${s.images.length} image${s.images.length === 1 ? "" : "s"}`),
      `, ${bytes(s.bytes)}, ${source}`));
    if (s.skipped) box.append(el("p", { class: "help" }, `${s.skipped} system file(s) skipped (.DS_Store, __MACOSX…).`));
    if (s.refused.length) {
      const head = s.kind === "zip"
        ? `The service will refuse this zip: ${s.refused.length} file(s) are not accepted. Remove them from the zip, `
          + "or drop the folder instead (a folder's other files are left out)."
        : `${s.refused.length} file(s) left out (they will not be sent):`;
      box.append(el("p", { class: "refused" }, head));
      const list = el("ul", { "aria-label": `Files not accepted in ${role}` });
      for (const r of s.refused.slice(0, 50)) list.append(el("li", {}, `${r.path}: ${r.reason}`));
      if (s.refused.length > 50) list.append(el("li", {}, `and ${s.refused.length - 50} more`));
      box.append(list);
    }
    if (!s.images.length && !s.refused.length) box.append(el("p", { class: "refused" }, "No images found."));
    const few = tooFew(role);
    if (few) box.append(el("p", { class: "refused" }, few));
  }

  /* The service's sample-size rule for the chosen protocol, or null when the set is large enough. */
  function tooFew(role) {
    const s = state.sets[role];
    const protocol = $("protocol").value || "directional";
    const minimum = state.rules && state.rules.minimum_images[protocol];
    if (!s || !minimum || !s.images.length || s.images.length >= minimum[role]) return null;
    return `The ${protocol} protocol needs at least ${minimum[role]} ${role} images; this set has `
      + `${s.images.length}. The service would refuse it.`;
  }
  $("protocol").addEventListener("change", () => {
    for (const role of ["published", "unpublished"]) if (state.sets[role]) preview(role);
  });

  async function filesOfEntry(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((res, rej) => entry.file(res, rej));
      file.relPath = prefix + entry.name;
      return [file];
    }
    const reader = entry.createReader();
    const out = [];
    for (;;) {
      const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
      if (!batch.length) break;
      for (const child of batch) out.push(...await filesOfEntry(child, `${prefix}${entry.name}/`));
    }
    return out;
  }

  for (const role of ["published", "unpublished"]) {
    $(`${role}-folder`).addEventListener("change", (e) => {
      if (e.target.files.length) setFolder(role, [...e.target.files]);
      e.target.value = "";
    });
    $(`${role}-zip`).addEventListener("change", (e) => {
      if (e.target.files.length) setZip(role, e.target.files[0]);
      e.target.value = "";
    });
    const zone = document.querySelector(`[data-drop="${role}"]`);
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", async (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      const dropped = [...e.dataTransfer.files];
      const items = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
      if (dropped.length === 1 && /\.zip$/i.test(dropped[0].name) && !(items[0] && items[0].isDirectory)) {
        setZip(role, dropped[0]);
        return;
      }
      if (!items.length) { // no file-system entries (some browsers, some sources): loose files
        setFolder(role, dropped.map((f) => { f.relPath = `dropped/${f.name}`; return f; }));
        return;
      }
      const files = [];
      for (const item of items) {
        // A dropped folder's files keep their paths below it; loose files go in a folder of their own.
        files.push(...await filesOfEntry(item, item.isFile ? "dropped/" : ""));
      }
      setFolder(role, files);
    });
  }

  // --- submitting ------------------------------------------------------------------------------

  $("audit-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const box = $("submit-error");
    const status = $("upload-status");
    box.hidden = true;
    const problems = [];
    for (const [role, label] of [["published", "published images (P)"], ["unpublished", "unpublished images (U)"]]) {
      const s = state.sets[role];
      if (!s) problems.push(`Choose the ${label}: a folder or a zip.`);
      else if (s.error) problems.push(`The ${label}: ${s.error}`);
      else if (s.blocking) problems.push(`The zip of the ${label} holds files the service refuses (listed above).`);
      else if (!s.images.length) problems.push(`There are no images in the ${label}.`);
      else if (tooFew(role)) problems.push(tooFew(role));
    }
    if (!$("model").value) problems.push("Choose a model.");
    if (problems.length) {
      box.replaceChildren(...problems.map((p) => el("p", {}, p)));
      box.hidden = false;
      box.focus();
      return;
    }
    const button = $("submit");
    button.disabled = true;
    try {
      const form = new FormData();
      form.append("model", $("model").value);
      for (const name of ["alpha", "protocol", "features", "precision", "batch_size", "seed"]) {
        const v = $(name).value.trim();
        if (v !== "") form.append(name, v);
      }
      // The sequential design's options travel only with a sequential audit.
      if ($("sequential").checked) {
        form.append("sequential", "true");
        for (const name of ["looks", "spending"]) {
          const v = $(name).value.trim();
          if (v !== "") form.append(name, v);
        }
        if ($("futility").checked) form.append("futility", "true");
      }
      for (const role of ["published", "unpublished"]) {
        const s = state.sets[role];
        if (s.kind === "zip") { form.append(role, s.file, s.file.name); continue; }
        const blob = await CdiZip.writeZip(s.images, (done, total) => {
          status.textContent = `Packing the ${role} images: ${done} of ${total}`;
        });
        form.append(role, blob, `${role}.zip`);
      }
      for (const name of ["labels", "captions"]) {
        if (!$(`${name}-field`).hidden && $(name).files.length) form.append(name, $(name).files[0]);
      }
      status.textContent = "Uploading…";
      const accepted = await upload("/v1/audits", form, (done, total) => {
        status.textContent = `Uploading: ${Math.round((100 * done) / total)} % of ${bytes(total)}`;
      });
      status.textContent = "";
      state.sets = { published: null, unpublished: null };
      preview("published");
      preview("unpublished");
      location.hash = `#audit/${accepted.id}`;
    } catch (err) {
      status.textContent = "";
      showError(box, err);
      box.focus();
    } finally {
      button.disabled = false;
    }
  });

  // --- one audit ---------------------------------------------------------------------------------

  function renderStages(audit) {
    const list = $("stages");
    const current = STAGES.findIndex(([s]) => s === audit.state);
    list.replaceChildren(...STAGES.map(([name, label], i) => {
      const li = el("li", {}, label);
      if (audit.state === "done" || (current >= 0 && i < current)) li.className = "done";
      if (i === current && audit.state !== "done") li.setAttribute("aria-current", "step");
      return li;
    }));
    const p = audit.progress || {};
    const bar = $("stage-bar");
    const text = $("stage-text");
    const ended = FINAL.includes(audit.state);
    for (const id of ["stage-label", "stage-bar", "stage-text"]) $(id).hidden = ended;
    if (ended) return;
    const label = (STAGES.find(([s]) => s === audit.state) || [null, audit.state])[1];
    if (p.total) {
      bar.max = p.total;
      bar.value = p.done;
      const what = ["validating", "extracting"].includes(p.stage) ? "images" : "steps";
      text.textContent = `${label}: ${p.done} of ${p.total} ${what} (${p.stage || audit.state})`;
    } else {
      bar.removeAttribute("value");
      text.textContent = `${label}…`;
    }
    $("stage-label").textContent = `Progress: ${label}`;
  }

  async function openAudit(id) {
    show("audit");
    state.audit = id;
    $("audit-title").textContent = "Audit";
    $("audit-meta").textContent = "";
    $("verdict").hidden = true;
    $("audit-error").hidden = true;
    $("download-json").hidden = true;
    $("download-pdf").hidden = true;
    $("audit-action-status").textContent = "";
    $("stages").replaceChildren();
    await pollAudit(id);
  }

  async function pollAudit(id) {
    if (state.audit !== id) return;
    let audit;
    try {
      audit = await api("GET", `/v1/audits/${encodeURIComponent(id)}`);
    } catch (err) {
      showError($("audit-error"), err);
      if (err.status === 0) state.poll = setTimeout(() => pollAudit(id), 5000);
      return;
    }
    if (state.audit !== id) return;
    $("audit-title").textContent = `Audit of ${audit.model}`;
    $("audit-meta").textContent = `${audit.n_published} published and ${audit.n_unpublished} unpublished images; `
      + `started ${new Date(audit.created_at).toLocaleString()}; id ${audit.id}`;
    renderStages(audit);
    $("delete-audit").disabled = Boolean(audit.deleted_at);
    if (audit.state === "failed") {
      showError($("audit-error"), new ApiError(0, audit.error.code,
        `The audit failed: ${audit.error.message} (${audit.error.code})`));
    } else if (audit.state === "cancelled") {
      showError($("audit-error"), new ApiError(0, "", "The audit was cancelled: it has no report."));
    } else if (audit.state === "done") {
      $("download-json").hidden = false;
      $("download-pdf").hidden = false;
      await renderVerdict(audit);
    } else {
      state.poll = setTimeout(() => pollAudit(id), 1500);
    }
  }

  async function renderVerdict(audit) {
    let x;
    try {
      x = await api("GET", `/v1/audits/${audit.id}/explanation`);
    } catch (err) {
      showError($("audit-error"), err);
      return;
    }
    const banner = $("banner");
    banner.className = `banner ${x.verdict}`;
    $("verdict-label").textContent = `Verdict: ${x.label}`;
    markup($("verdict-headline"), x.headline);
    markup($("verdict-p"), x.p_value);
    $("verdict-tested").replaceChildren(...x.tested.map((t) => { const li = el("li"); markup(li, t); return li; }));
    markup($("verdict-means"), x.means);
    markup($("verdict-not-means"), x.not_means);
    $("verdict-controls").replaceChildren(...x.controls.map((c) => {
      const text = el("td");
      markup(text, c.text);
      return el("tr", {}, el("th", { scope: "row" }, c.name), el("td", { class: c.failed ? "failed" : "" }, c.outcome),
        text);
    }));
    $("verdict-warnings").replaceChildren(...x.warnings.map((w) => {
      const p = el("p", { class: "small" }, el("em", {}, "Note: "));
      const span = el("span");
      markup(span, w);
      p.append(span);
      return p;
    }));
    markup($("verdict-check"), x.check);
    $("verdict").hidden = false;
    const figures = $("figures");
    figures.replaceChildren();
    for (const f of x.figures) {
      const img = f.name === "p-value" ? $("fig-p-value") : el("img", { alt: f.caption, width: "670" });
      img.alt = f.caption;
      if (f.name !== "p-value") figures.append(el("figure", {}, img, el("figcaption", {}, f.caption)));
      loadFigure(img, f.url);
    }
  }

  async function loadFigure(img, url) {
    // Shown once drawn: an image with no picture yet would flash as a broken one.
    img.hidden = true;
    img.addEventListener("load", () => { img.hidden = false; }, { once: true });
    try {
      const response = await api("GET", url, { raw: true });
      img.src = URL.createObjectURL(await response.blob());
    } catch (err) {
      img.replaceWith(el("p", { class: "help" }, `This figure is not available: ${err.message}`));
    }
  }

  $("download-json").addEventListener("click", () => download(`/v1/audits/${state.audit}/report`,
    `cdi-audit-${state.audit}.json`, $("audit-action-status")));
  $("download-pdf").addEventListener("click", () => download(`/v1/audits/${state.audit}/report.pdf`,
    `cdi-audit-${state.audit}.pdf`, $("audit-action-status")));
  $("delete-audit").addEventListener("click", async () => {
    if (!await deleteAudit(state.audit)) return;
    openAudit(state.audit);
  });

  async function deleteAudit(id) {
    if (!window.confirm("Delete this audit? A running audit is cancelled; its uploaded images are deleted. "
      + "A finished audit keeps its report.")) return false;
    try {
      await api("DELETE", `/v1/audits/${encodeURIComponent(id)}`);
      return true;
    } catch (err) {
      window.alert(err.message);
      return false;
    }
  }

  // --- past audits ---------------------------------------------------------------------------------

  async function listAudits(first) {
    show("audits");
    const status = $("audits-status");
    const body = $("audits-body");
    if (first) { state.cursor = null; body.replaceChildren(); }
    status.textContent = "Loading…";
    let page;
    try {
      page = await api("GET", `/v1/audits?limit=20${state.cursor ? `&cursor=${encodeURIComponent(state.cursor)}` : ""}`);
    } catch (err) {
      status.textContent = err.message;
      return;
    }
    state.cursor = page.next_cursor;
    for (const a of page.items) {
      const open = el("a", { href: `#audit/${a.id}` }, "Open");
      open.setAttribute("aria-label", `Open the audit of ${a.model} started ${new Date(a.created_at).toLocaleString()}`);
      const del = el("button", { type: "button", class: "danger" }, "Delete");
      del.setAttribute("aria-label", `Delete the audit of ${a.model} started ${new Date(a.created_at).toLocaleString()}`);
      if (a.deleted_at) { del.disabled = true; del.title = "Deleted already"; }
      del.addEventListener("click", async () => { if (await deleteAudit(a.id)) listAudits(true); });
      body.append(el("tr", {},
        el("td", {}, new Date(a.created_at).toLocaleString()),
        el("td", {}, a.model),
        el("td", {}, `${a.n_published} / ${a.n_unpublished}`),
        el("td", { class: a.state === "failed" ? "state-failed" : "" },
          a.state + (a.deleted_at ? " (deleted)" : a.images_deleted ? " (images deleted)" : "")),
        el("td", { class: a.verdict ? `verdict-${a.verdict}` : "" }, a.verdict ? a.verdict.replace("_", " ") : "—"),
        el("td", {}, formatP(a.p_value)),
        el("td", {}, el("span", { class: "actions" }, open, del))));
    }
    $("audits-table").hidden = body.children.length === 0;
    status.textContent = body.children.length ? "" : "No audits yet. Start one under New audit.";
    $("audits-more").hidden = !state.cursor;
  }
  $("audits-more").addEventListener("click", () => listAudits(false));

  loadOptions();
  route();
})();
