// The streamsvc playground: a chat panel and a connector panel.
//
// Chat POSTs with fetch and reads the Server-Sent Events off the response body
// with a streaming reader (EventSource cannot POST); Stop aborts the request and
// the server cancels the upstream call. A connector run starts in the background
// and is followed with an EventSource on its events_url (resumable, survives a
// reload); Stop calls POST /runs/{id}/cancel, which kills the container.
"use strict";

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ the wire

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.error = error; // {code, message, path, details}
  }
}

function headers() {
  const result = { "Content-Type": "application/json", Accept: "text/event-stream" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// One SSE block ("event: x\nid: 3\ndata: {...}") as {name, id, data}; null for comments.
function parseBlock(block) {
  let name = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  if (!data.length) return null;
  return { name, id, data: JSON.parse(data.join("\n")) };
}

// POST body as a stream and yield its events until the server ends it; onRun(id) gets
// the run's id (X-Run-ID) as soon as the headers are in.
async function* postStream(path, body, signal, onRun = null) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  const type = response.headers.get("content-type") || "";
  if (!response.ok || !type.startsWith("text/event-stream")) {
    const text = await response.text();
    let error;
    try {
      error = JSON.parse(text).error;
    } catch {
      error = null;
    }
    throw new ApiError(response.status, error || { code: "http_error", message: text.slice(0, 300) });
  }
  if (onRun && response.headers.get("x-run-id")) onRun(response.headers.get("x-run-id"));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      buffer = buffer.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseBlock(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event) yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
  const last = parseBlock(buffer);
  if (last) yield last;
}

// ------------------------------------------------------------------ helpers

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function setState(panel, badge, state) {
  $(panel).dataset.state = state;
  $(badge).textContent = state;
  $(badge).className = `badge ${state}`;
}

function showError(box, err) {
  const node = $(box);
  node.replaceChildren();
  if (!err) {
    node.hidden = true;
    return;
  }
  const error = err instanceof ApiError ? err.error : { code: err.code || "error", message: String(err.message || err) };
  const status = err instanceof ApiError ? `${err.status} ` : "";
  node.append(h("strong", {}, `${status}${error.code}`), ": ", error.message || "");
  if (error.path) node.append(h("span", { class: "path" }, ` at ${error.path}`));
  const problems = error.details && Array.isArray(error.details.problems) ? error.details.problems : [];
  if (problems.length) {
    node.append(h("ul", {}, ...problems.map((p) => h("li", {}, h("code", {}, p.path), ` ${p.message} (${p.code})`))));
  }
  node.hidden = false;
}

function isAbort(err) {
  return err && err.name === "AbortError";
}

function scrollDown(node) {
  node.scrollTop = node.scrollHeight;
}

// ------------------------------------------------------------------ chat

const chat = { history: [], controller: null, runId: null, stopping: false };

function chatBubble(role, text) {
  const body = h("div", { class: "text" }, text);
  const bubble = h("div", { class: `message ${role}` }, h("div", { class: "role" }, role), body);
  const log = $("chat-log");
  log.querySelector(".hint")?.remove();
  log.append(bubble);
  scrollDown(log);
  return body;
}

async function sendChat(event) {
  event.preventDefault();
  if (chat.controller) return;
  const prompt = $("chat-prompt").value.trim();
  if (!prompt) return;
  showError("chat-error", null);
  $("chat-meta").textContent = "";
  const messages = [];
  const system = $("chat-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chat.history, { role: "user", content: prompt });
  const body = { messages };
  const model = $("chat-model").value.trim();
  if (model) body.model = model;
  if ($("chat-temperature").value !== "") body.temperature = Number($("chat-temperature").value);
  if ($("chat-max-tokens").value !== "") body.max_tokens = Number($("chat-max-tokens").value);

  chatBubble("user", prompt);
  $("chat-prompt").value = "";
  const output = chatBubble("assistant", "");
  output.classList.add("streaming");
  output.id = "chat-output";
  const controller = new AbortController();
  chat.controller = controller;
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  setState("chat-panel", "chat-state", "streaming");
  let text = "";
  let finished = "stopped";
  try {
    const onRun = (id) => {
      chat.runId = id;
    };
    for await (const ev of postStream("/chat", body, controller.signal, onRun)) {
      if (ev.name === "delta") {
        text += ev.data.content;
        output.append(ev.data.content);
        scrollDown($("chat-log"));
      } else if (ev.name === "done") {
        const usage = ev.data.usage ? ` · ${ev.data.usage.prompt_tokens} + ${ev.data.usage.completion_tokens} tokens` : "";
        $("chat-meta").textContent = `${ev.data.model} · finish: ${ev.data.finish_reason}${usage}`;
        chat.history.push({ role: "user", content: prompt }, { role: "assistant", content: ev.data.content });
        finished = "done";
      } else if (ev.name === "error") {
        throw new ApiError(200, ev.data.error);
      }
    }
    if (finished !== "done") throw new Error("the stream ended without a result");
  } catch (err) {
    if (isAbort(err) || chat.stopping) {
      finished = "stopped";
      $("chat-meta").textContent = "stopped: the run was cancelled";
    } else {
      finished = "error";
      showError("chat-error", err);
    }
    if (!text) output.parentElement.remove();
  } finally {
    output.classList.remove("streaming");
    output.removeAttribute("id");
    chat.controller = null;
    chat.runId = null;
    chat.stopping = false;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    setState("chat-panel", "chat-state", finished);
  }
}

// Stop is immediate: the run is cancelled (a dropped stream alone would keep it for a
// grace period, waiting for a reader to come back), then the request is aborted.
function stopChat() {
  const controller = chat.controller;
  if (!controller) return;
  const id = chat.runId;
  chat.stopping = true;
  if (id) {
    fetch(`/runs/${encodeURIComponent(id)}/cancel`, { method: "POST", headers: headers() })
      .catch(() => null)
      .finally(() => controller.abort());
  } else {
    controller.abort();
  }
}

function clearChat() {
  stopChat();
  chat.history = [];
  $("chat-log").replaceChildren();
  $("chat-meta").textContent = "";
  showError("chat-error", null);
  setState("chat-panel", "chat-state", "idle");
}

// ------------------------------------------------------------------ connector
//
// The connector is edited as files: one tab per file (a CodeMirror editor each,
// from /static/editor.js), dependencies as a list, configuration as JSON, env as
// name/value rows with a secret toggle. buildRequest() turns the form into a
// POST /execute-connector body; loadRequest() fills the form from one.

const run = {
  examples: [], example: null, files: new Map(), active: null, extra: {}, runtimeExtra: {},
  source: null, current: null, starting: false, seen: [], reconnects: 0, leaving: false,
};
// Leaving the page closes the EventSource; the run goes on and the next load re-attaches.
for (const name of ["beforeunload", "pagehide"]) {
  window.addEventListener(name, () => {
    run.leaving = true;
  });
}
const json = { config: null, overrides: null };

//: The server's default rule for names whose values are always secret.
const SECRET_NAME = /SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|KEY$|_(?:PASS|PWD|AUTH|DSN|COOKIE)$/i;
const looksSecret = (name) => SECRET_NAME.test(name);

function inputError(message) {
  return Object.assign(new Error(message), { code: "invalid_input" });
}

// ---- files

function selectFile(name) {
  run.active = name;
  for (const [fileName, file] of run.files) {
    const selected = fileName === name;
    file.tab.setAttribute("aria-selected", String(selected));
    file.tab.classList.toggle("active", selected);
    file.pane.hidden = !selected;
  }
}

function refreshEntryPoints(preferred) {
  const select = $("run-entry");
  const current = preferred || select.value;
  const names = [...run.files.keys()].filter((name) => name.endsWith(".py"));
  select.replaceChildren(...names.map((name) => h("option", { value: name }, name)));
  if (names.includes(current)) select.value = current;
}

function addFile(name, text) {
  const pane = h("div", { class: "editor", "data-file": name, role: "tabpanel" });
  $("file-editors").append(pane);
  const editor = window.StreamsvcEditor.create(pane, { doc: text, language: window.StreamsvcEditor.languageFor(name), minLines: 14 });
  const label = h("button", { type: "button", class: "tab-name", role: "tab" }, name);
  const close = h("button", { type: "button", class: "tab-close", title: `Remove ${name}`, "aria-label": `Remove ${name}` }, "×");
  const tab = h("span", { class: "tab", "data-file": name }, label, close);
  label.addEventListener("click", () => selectFile(name));
  close.addEventListener("click", () => removeFile(name));
  $("file-tabs").append(tab);
  run.files.set(name, { editor, tab, pane });
}

function removeFile(name) {
  const file = run.files.get(name);
  if (!file) return;
  file.editor.destroy();
  file.tab.remove();
  file.pane.remove();
  run.files.delete(name);
  refreshEntryPoints();
  if (run.active === name) selectFile(run.files.keys().next().value ?? null);
}

function newFile() {
  const name = $("file-new").value.trim();
  showError("run-error", null);
  if (!name) return;
  if (run.files.has(name)) {
    showError("run-error", inputError(`a file named ${name} exists`));
    return;
  }
  addFile(name, name.endsWith(".py") ? "" : name.endsWith(".json") ? "{}\n" : "");
  $("file-new").value = "";
  refreshEntryPoints();
  selectFile(name);
  run.files.get(name).editor.focus();
}

function clearFiles() {
  for (const name of [...run.files.keys()]) removeFile(name);
}

// ---- dependencies and env rows

function removeButton(row, label) {
  const button = h("button", { type: "button", class: "row-remove", title: label, "aria-label": label }, "×");
  button.addEventListener("click", () => row.remove());
  return button;
}

function addDependency(text = "") {
  const input = h("input", { class: "dep", placeholder: "requests==2.32.3", spellcheck: "false", "aria-label": "Requirement" });
  input.value = text;
  const row = h("div", { class: "dep-row" }, input);
  row.append(removeButton(row, "Remove this dependency"));
  $("deps-rows").append(row);
  return input;
}

// One dependency of any accepted form (requirement string, {name, version}, name: version) as a requirement.
function requirement(name, version) {
  const text = version == null ? "" : String(version).trim();
  if (!text || text === "*") return String(name);
  return /^[<>=!~]/.test(text) ? `${name}${text}` : `${name}==${text}`;
}

function dependencyList(raw) {
  if (!raw) return [];
  if (typeof raw === "string") return raw.split("\n").map((line) => line.trim()).filter(Boolean);
  if (Array.isArray(raw)) return raw.map((item) => (typeof item === "string" ? item : requirement(item.name, item.version)));
  return Object.entries(raw).map(([name, version]) => requirement(name, version));
}

function syncSecret(row) {
  const name = row.querySelector(".env-name").value.trim();
  const toggle = row.querySelector(".env-secret");
  const forced = looksSecret(name);
  if (forced) toggle.checked = true;
  toggle.disabled = forced;
  toggle.parentElement.title = forced ? "names like this are always secret" : "redact this value from the output";
  row.querySelector(".env-value").type = toggle.checked ? "password" : "text";
}

function addEnv(name = "", value = "", secret = false) {
  const nameInput = h("input", { class: "env-name", placeholder: "NAME", spellcheck: "false", "aria-label": "Name" });
  const valueInput = h("input", { class: "env-value", placeholder: "value", spellcheck: "false", autocomplete: "off", "aria-label": "Value" });
  const toggle = h("input", { type: "checkbox", class: "env-secret" });
  nameInput.value = name;
  valueInput.value = value;
  toggle.checked = secret;
  const row = h("div", { class: "env-row" }, nameInput, valueInput, h("label", { class: "secret" }, toggle, "secret"));
  row.append(removeButton(row, "Remove this variable"));
  nameInput.addEventListener("input", () => syncSecret(row));
  toggle.addEventListener("change", () => syncSecret(row));
  $("env-rows").append(row);
  syncSecret(row);
  return row;
}

// ---- the whole form

function loadRequest(body) {
  const connector = body.connector || {};
  const { runtime = {}, files = {}, configuration = {}, ...extra } = connector;
  const { language, entryPoint, timeoutMs, memoryMb, dependencies, ...runtimeExtra } = runtime;
  run.extra = extra;
  run.runtimeExtra = { language: language || "python", ...runtimeExtra };
  clearFiles();
  for (const [name, text] of Object.entries(files)) addFile(name, String(text));
  refreshEntryPoints(entryPoint);
  selectFile(run.files.has(entryPoint) ? entryPoint : run.files.keys().next().value ?? null);
  $("run-timeout").value = timeoutMs ?? "";
  $("run-memory").value = memoryMb ?? "";
  $("run-network").value = body.network_mode || "none";
  $("deps-rows").replaceChildren();
  for (const dep of dependencyList(dependencies)) addDependency(dep);
  json.config.setValue(JSON.stringify(configuration, null, 2));
  json.overrides.setValue(JSON.stringify(body.configuration_overrides || {}, null, 2));
  $("env-rows").replaceChildren();
  const secrets = new Set(body.secrets || []);
  for (const [name, value] of Object.entries(body.env || {})) addEnv(name, String(value), secrets.has(name));
}

function parseEditor(editor, label) {
  const text = editor.getValue().trim();
  if (!text) return {};
  try {
    return JSON.parse(text);
  } catch (err) {
    throw Object.assign(new Error(`${label}: ${err.message}`), { code: "invalid_json" });
  }
}

function buildRequest() {
  const files = {};
  for (const [name, file] of run.files) files[name] = file.editor.getValue();
  const runtime = { ...run.runtimeExtra, entryPoint: $("run-entry").value };
  if ($("run-timeout").value !== "") runtime.timeoutMs = Number($("run-timeout").value);
  if ($("run-memory").value !== "") runtime.memoryMb = Number($("run-memory").value);
  const dependencies = [...document.querySelectorAll("#deps-rows .dep")].map((input) => input.value.trim()).filter(Boolean);
  if (dependencies.length) runtime.dependencies = dependencies;
  const env = {};
  const secrets = [];
  for (const row of document.querySelectorAll("#env-rows .env-row")) {
    const name = row.querySelector(".env-name").value.trim();
    if (!name) continue;
    if (name in env) throw inputError(`env: ${name} is named twice`);
    env[name] = row.querySelector(".env-value").value;
    // Names that look secret are secret anyway; the others are declared.
    if (row.querySelector(".env-secret").checked && !looksSecret(name)) secrets.push(name);
  }
  const body = {
    connector: { ...run.extra, runtime, configuration: parseEditor(json.config, "Configuration"), files },
    env,
    configuration_overrides: parseEditor(json.overrides, "configuration_overrides"),
    network_mode: $("run-network").value,
  };
  if (secrets.length) body.secrets = secrets;
  return body;
}

// ---- the run

function addStatus(phase, message) {
  const time = new Date().toLocaleTimeString();
  const item = h("li", { class: `phase-${phase}` }, h("span", { class: "phase" }, phase.replaceAll("_", " ")), ` ${message || ""}`, h("time", {}, time));
  $("run-status").append(item);
}

function appendOut(id, text) {
  const pane = $(id);
  pane.append(text);
  scrollDown(pane);
}

function formatBytes(size) {
  if (size < 1024) return `${size} B`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} KiB`;
  return `${(size / 1024 / 1024).toFixed(1)} MiB`;
}

function fileLink(file) {
  const bytes = Uint8Array.from(atob(file.content_base64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: file.media_type || "application/octet-stream" }));
  return h("a", { href: url, download: file.name.split("/").pop() }, file.name);
}

// A file past the inline cap: its url on the run, opened with the run's read token (a
// link cannot send the API key); only a path of this server is linked.
function downloadLink(file) {
  const token = run.current && new URL(run.current.events_url, location.href).searchParams.get("token");
  const href = `${file.url}${token ? `?token=${encodeURIComponent(token)}` : ""}`;
  return h("a", { href, download: file.name.split("/").pop(), class: "download" }, file.name);
}

function showFiles(files, omitted) {
  const list = $("run-files");
  list.replaceChildren();
  for (const file of files || []) {
    const remote = typeof file.url === "string" && file.url.startsWith("/runs/") && !file.url.startsWith("//");
    const name = file.content_base64 ? fileLink(file) : remote ? downloadLink(file) : h("span", { class: "name" }, file.name);
    const facts = [formatBytes(file.size || 0), file.media_type, file.sha256 && `sha256 ${file.sha256.slice(0, 12)}…`].filter(Boolean);
    const item = h("li", { "data-name": file.name }, name, h("span", { class: "facts" }, ` ${facts.join(" · ")}`));
    if (file.error) item.append(h("span", { class: "file-error" }, ` ${file.error.code || ""}: ${file.error.message || ""}`));
    list.append(item);
  }
  if (omitted) list.append(h("li", { class: "omitted" }, `${omitted} more not listed`));
}

function showUsage(usage) {
  const parts = [];
  if (usage) {
    if (usage.cpu_ms != null) parts.push(`cpu ${usage.cpu_ms} ms`);
    if (usage.memory_peak_mb != null) parts.push(`memory peak ${usage.memory_peak_mb} MB`);
    if (usage.wall_ms != null) parts.push(`wall ${usage.wall_ms} ms`);
  }
  $("run-usage").textContent = parts.length ? `usage: ${parts.join(" · ")}` : "";
}

function showResult(result) {
  const parts = [result.ok ? "ok" : "failed", `exit code ${result.exit_code}`, `${result.duration_ms} ms`];
  if (result.timed_out) parts.push("timed out");
  if (result.oom_killed) parts.push("out of memory");
  if (result.redacted) parts.push("secrets redacted");
  if (result.run_id) parts.push(`run ${result.run_id}`);
  if (result.error) parts.push(`${result.error.code}: ${result.error.message}`);
  $("run-summary").textContent = parts.join(" · ");
  $("run-summary").className = `meta ${result.ok ? "ok" : "failed"}`;
  showUsage(result.usage);
  showFiles(result.files, result.files_omitted);
  $("run-result").textContent = JSON.stringify(result.result, null, 2);
}

function clearOutput() {
  for (const id of ["run-status", "run-stdout", "run-stderr", "run-result", "run-summary", "run-usage", "run-files"]) $(id).replaceChildren();
  showError("run-error", null);
}

// ---- the run: started in the background, followed with an EventSource
//
// POST /execute-connector with "background": true answers 202 with the run's
// events_url (a read-only token for that run in its query, as EventSource cannot
// send an API key). The EventSource follows it and, when the connection drops,
// reconnects by itself with Last-Event-ID: the server replays what was missed.
// The run is remembered in localStorage until it ends, so a reload re-attaches.

const LAST_RUN = "streamsvc-last-run";

function busy(running) {
  $("run-start").disabled = running;
  $("run-stop").disabled = !running;
}

function remember(entry) {
  if (entry) localStorage.setItem(LAST_RUN, JSON.stringify(entry));
  else localStorage.removeItem(LAST_RUN);
}

function finish(state) {
  run.source?.close();
  run.source = null;
  remember(null);
  busy(false);
  setState("run-panel", "run-state", state);
}

function onRunEvent(ev) {
  const id = Number(ev.lastEventId);
  run.seen.push(id);
  const data = JSON.parse(ev.data);
  if (ev.type === "status") addStatus(data.phase, data.message);
  else if (ev.type === "stdout") appendOut("run-stdout", data.text);
  else if (ev.type === "stderr") appendOut("run-stderr", data.text);
  else if (ev.type === "done") {
    showResult(data);
    finish(data.ok ? "done" : "failed");
  } else if (ev.type === "error") {
    const error = data.error || {};
    if (error.code === "cancelled") {
      addStatus("stopped", error.message || "the run was cancelled; its container is removed");
      finish("stopped");
    } else {
      showError("run-error", new ApiError(200, error));
      finish("error");
    }
  }
}

// Follow a run's events from the start (a reload replays what was already shown).
function follow(entry) {
  run.current = entry;
  run.seen = [];
  const source = new EventSource(entry.events_url);
  run.source = source;
  for (const name of ["status", "stdout", "stderr", "done"]) source.addEventListener(name, onRunEvent);
  source.addEventListener("error", (ev) => {
    if (ev instanceof MessageEvent && ev.data) {
      onRunEvent(ev); // the run's own terminal error event
    } else if (source.readyState === EventSource.CONNECTING) {
      run.reconnects += 1; // the connection dropped: EventSource retries with Last-Event-ID
      $("run-state").textContent = "reconnecting";
    } else if (run.source === source) {
      // Closed for good (an answer other than a stream). Leaving the page closes it too, and
      // then the run must stay remembered: a timer does not fire once the page is gone.
      setTimeout(() => {
        if (run.source !== source || run.leaving) return;
        showError("run-error", new Error(`lost the run's events (${entry.id}); see GET /runs/${entry.id}`));
        finish("error");
      }, 250);
    }
  });
  source.addEventListener("open", () => {
    if (run.source === source) $("run-state").textContent = "running";
  });
  busy(true);
  setState("run-panel", "run-state", "running");
}

async function startRun(event) {
  event.preventDefault();
  if (run.source || run.starting) return;
  clearOutput();
  let body;
  try {
    body = buildRequest();
  } catch (err) {
    showError("run-error", err);
    setState("run-panel", "run-state", "error");
    return;
  }
  run.starting = true;
  busy(true);
  setState("run-panel", "run-state", "running");
  try {
    const response = await fetch("/execute-connector", {
      method: "POST",
      headers: { ...headers(), Accept: "application/json" },
      body: JSON.stringify({ ...body, background: true }),
    });
    const answer = await response.json().catch(() => null);
    if (response.status !== 202 || !answer || !answer.events_url) {
      const error = (answer && answer.error) || { code: "http_error", message: `HTTP ${response.status}` };
      throw new ApiError(response.status, error);
    }
    const entry = { id: answer.id, events_url: answer.events_url, started_at: Date.now(), request: withoutSecrets(body) };
    try {
      remember(entry);
    } catch {
      remember({ ...entry, request: null }); // past the storage quota: the run alone
    }
    follow(entry);
  } catch (err) {
    showError("run-error", err);
    finish("error");
  } finally {
    run.starting = false;
  }
}

async function stopRun() {
  const entry = run.current;
  if (!entry || !run.source) return;
  $("run-stop").disabled = true;
  try {
    const response = await fetch(`/runs/${encodeURIComponent(entry.id)}/cancel`, { method: "POST", headers: headers() });
    if (!response.ok) {
      const answer = await response.json().catch(() => ({}));
      throw new ApiError(response.status, answer.error || { code: "http_error", message: `HTTP ${response.status}` });
    }
    // The events end with the run's "cancelled" error event, which finishes the panel.
  } catch (err) {
    showError("run-error", err);
    $("run-stop").disabled = false;
  }
}

// The request as kept in localStorage: secret values are never stored (their names are).
function withoutSecrets(body) {
  const declared = new Set(body.secrets || []);
  const env = Object.fromEntries(
    Object.entries(body.env || {}).map(([name, value]) => [name, declared.has(name) || looksSecret(name) ? "" : value]),
  );
  return { ...body, env };
}

// After a reload: the run that was going on when the page went away, followed again.
function reattach() {
  let entry = null;
  try {
    entry = JSON.parse(localStorage.getItem(LAST_RUN) || "null");
  } catch {
    entry = null;
  }
  if (!entry || typeof entry.events_url !== "string" || !entry.events_url.startsWith("/runs/")) {
    remember(null);
    return;
  }
  if (entry.request && typeof entry.request === "object") loadRequest(entry.request);
  addStatus("reattached", `following run ${entry.id} again`);
  follow(entry);
}

// ---- examples

function chooseExample(id) {
  const example = run.examples.find((e) => e.id === id);
  if (!example) return;
  run.example = example;
  $("run-example").value = id;
  $("run-example").title = example.description || example.title;
  loadRequest(example.request);
}

async function loadExamples() {
  const response = await fetch("/playground/examples");
  if (!response.ok) throw new Error(`GET /playground/examples: HTTP ${response.status}`);
  run.examples = (await response.json()).examples;
  $("run-example").replaceChildren(...run.examples.map((e) => h("option", { value: e.id, title: e.description }, e.title)));
  chooseExample(run.examples[0]?.id);
}

// ------------------------------------------------------------------ start-up

async function checkHealth() {
  const node = $("health");
  try {
    const report = await (await fetch("/health")).json();
    const parts = Object.entries(report.components).map(([name, c]) => `${name}: ${c.state}`);
    node.textContent = parts.join(" · ");
    node.className = `health ${report.status}`;
  } catch {
    node.textContent = "server unreachable";
    node.className = "health degraded";
  }
}

function start() {
  const stored = sessionStorage.getItem("streamsvc-api-key");
  if (stored) $("api-key").value = stored;
  $("api-key").addEventListener("change", () => sessionStorage.setItem("streamsvc-api-key", $("api-key").value));
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-stop").addEventListener("click", stopChat);
  $("chat-clear").addEventListener("click", clearChat);
  $("chat-prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("chat-form").requestSubmit();
  });
  $("run-form").addEventListener("submit", startRun);
  $("run-stop").addEventListener("click", stopRun);
  $("run-reset").addEventListener("click", () => chooseExample(run.example?.id));
  $("run-example").addEventListener("change", () => chooseExample($("run-example").value));
  $("file-add").addEventListener("click", newFile);
  $("file-new").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      newFile();
    }
  });
  $("dep-add").addEventListener("click", () => addDependency().focus());
  $("env-add").addEventListener("click", () => addEnv().querySelector(".env-name").focus());
  json.config = window.StreamsvcEditor.create($("config-editor"), { language: "json", minLines: 5 });
  json.overrides = window.StreamsvcEditor.create($("overrides-editor"), { language: "json", minLines: 5 });
  // For tests and the console: what the form would send, and filling it from a request body.
  window.playground = { buildRequest, loadRequest, run };
  checkHealth();
  loadExamples()
    .catch((err) => showError("run-error", err))
    .finally(() => {
      reattach();
      document.body.setAttribute("data-ready", "true");
    });
}

document.addEventListener("DOMContentLoaded", start);
