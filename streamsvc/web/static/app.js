// The streamsvc playground: a chat panel and a connector panel.
//
// Both POST with fetch and read the Server-Sent Events off the response body
// with a streaming reader (EventSource cannot POST). Stop aborts the request;
// the server then cancels the upstream call or kills the container.
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

// POST body as a stream and yield its events until the server ends it.
async function* postStream(path, body, signal) {
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

function parseJsonField(id, label, fallback) {
  const text = $(id).value.trim();
  if (!text) return fallback;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw Object.assign(new Error(`${label}: ${err.message}`), { code: "invalid_json" });
  }
}

function isAbort(err) {
  return err && err.name === "AbortError";
}

function scrollDown(node) {
  node.scrollTop = node.scrollHeight;
}

// ------------------------------------------------------------------ chat

const chat = { history: [], controller: null };

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
    for await (const ev of postStream("/chat", body, controller.signal)) {
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
    if (isAbort(err)) {
      finished = "stopped";
      $("chat-meta").textContent = "stopped: the request was aborted";
    } else {
      finished = "error";
      showError("chat-error", err);
    }
    if (!text) output.parentElement.remove();
  } finally {
    output.classList.remove("streaming");
    output.removeAttribute("id");
    chat.controller = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    setState("chat-panel", "chat-state", finished);
  }
}

function stopChat() {
  chat.controller?.abort();
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

const run = { controller: null, example: null };

function fillExample() {
  const example = run.example;
  if (!example) return;
  $("run-connector").value = JSON.stringify(example.connector, null, 2);
  $("run-env").value = JSON.stringify(example.env || {}, null, 2);
  $("run-overrides").value = JSON.stringify(example.configuration_overrides || {}, null, 2);
  $("run-network").value = example.network_mode || "none";
}

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

function showResult(result) {
  const parts = [result.ok ? "ok" : "failed", `exit code ${result.exit_code}`, `${result.duration_ms} ms`];
  if (result.timed_out) parts.push("timed out");
  if (result.oom_killed) parts.push("out of memory");
  if (result.error) parts.push(`${result.error.code}: ${result.error.message}`);
  $("run-summary").textContent = parts.join(" · ");
  $("run-summary").className = `meta ${result.ok ? "ok" : "failed"}`;
  $("run-result").textContent = JSON.stringify(result.result, null, 2);
}

async function startRun(event) {
  event.preventDefault();
  if (run.controller) return;
  for (const id of ["run-status", "run-stdout", "run-stderr", "run-result", "run-summary"]) $(id).replaceChildren();
  showError("run-error", null);
  let body;
  try {
    body = {
      connector: parseJsonField("run-connector", "Connector", null),
      env: parseJsonField("run-env", "env", {}),
      configuration_overrides: parseJsonField("run-overrides", "configuration_overrides", {}),
      network_mode: $("run-network").value,
    };
  } catch (err) {
    showError("run-error", err);
    setState("run-panel", "run-state", "error");
    return;
  }
  const controller = new AbortController();
  run.controller = controller;
  $("run-start").disabled = true;
  $("run-stop").disabled = false;
  setState("run-panel", "run-state", "running");
  let finished = "error";
  try {
    for await (const ev of postStream("/execute-connector", body, controller.signal)) {
      if (ev.name === "status") addStatus(ev.data.phase, ev.data.message);
      else if (ev.name === "stdout") appendOut("run-stdout", ev.data.text);
      else if (ev.name === "stderr") appendOut("run-stderr", ev.data.text);
      else if (ev.name === "done") {
        showResult(ev.data);
        finished = ev.data.ok ? "done" : "failed";
      } else if (ev.name === "error") throw new ApiError(200, ev.data.error);
    }
    if (finished === "error") throw new Error("the stream ended without a result");
  } catch (err) {
    if (isAbort(err)) {
      finished = "stopped";
      addStatus("stopped", "the request was aborted; the server stops the container");
    } else {
      finished = "error";
      showError("run-error", err);
    }
  } finally {
    run.controller = null;
    $("run-start").disabled = false;
    $("run-stop").disabled = true;
    setState("run-panel", "run-state", finished);
  }
}

function stopRun() {
  run.controller?.abort();
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

async function loadExample() {
  try {
    run.example = await (await fetch("/static/seed-example.json")).json();
    fillExample();
  } catch (err) {
    showError("run-error", err);
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
  $("run-reset").addEventListener("click", fillExample);
  checkHealth();
  loadExample().then(() => document.body.setAttribute("data-ready", "true"));
}

document.addEventListener("DOMContentLoaded", start);
