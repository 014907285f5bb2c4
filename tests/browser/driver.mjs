// A small browser driver for tests/test_playground.py.
//
// Launches Debian's chromium (never a downloaded browser) headless with a
// fresh profile through playwright-core, then answers one JSON command per
// line on stdin with one JSON reply per line on stdout:
//   {"id": 1, "op": "goto", "url": "..."}  ->  {"id": 1, "ok": true, "value": null}
// Ops: goto, wait_for, wait_function, fill, select, click, check, press, type,
// replace_text, text, value, eval, screenshot, errors, close. Page errors and
// console errors are collected and returned by "errors", so a test can assert the page ran cleanly.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import readline from "node:readline";
import { chromium } from "playwright-core";

const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const profile = mkdtempSync(join(tmpdir(), "streamsvc-chromium-"));
const errors = [];

const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  args: FLAGS,
  viewport: { width: 1500, height: 1100 },
  deviceScaleFactor: 1,
});
const page = context.pages()[0] || (await context.newPage());
page.on("pageerror", (err) => errors.push(`pageerror: ${err.message}`));
page.on("console", (msg) => {
  if (msg.type() === "error") errors.push(`console: ${msg.text()}`);
});

const ops = {
  goto: ({ url }) => page.goto(url, { waitUntil: "load" }).then(() => null),
  wait_for: ({ selector, state = "visible", timeout = 30000 }) =>
    page.waitForSelector(selector, { state, timeout }).then(() => null),
  // Polls with page.evaluate (CDP evaluation, which the page's CSP does not block).
  wait_function: async ({ expression, timeout = 30000 }) => {
    const deadline = Date.now() + timeout;
    for (;;) {
      const value = await page.evaluate(expression);
      if (value) return value;
      if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms: ${expression}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  },
  fill: ({ selector, value }) => page.fill(selector, value),
  select: ({ selector, value }) => page.selectOption(selector, value).then(() => null),
  click: ({ selector }) => page.click(selector),
  check: ({ selector, checked = true }) => page.setChecked(selector, checked),
  press: ({ selector, key }) => page.press(selector, key),
  // Key by key, as a person types (a code editor sees every keystroke).
  type: ({ selector, text }) => page.locator(selector).pressSequentially(text),
  // Focus, select all, delete, then insert the text as one input (a paste, without the
  // clipboard). The delete is a key the editor handles itself, not the browser's editing.
  replace_text: async ({ selector, text }) => {
    await page.click(selector);
    await page.keyboard.press("ControlOrMeta+A");
    await page.keyboard.press("Backspace");
    await page.keyboard.insertText(text);
  },
  text: ({ selector }) => page.textContent(selector),
  value: ({ selector }) => page.inputValue(selector),
  eval: ({ expression }) => page.evaluate(expression),
  screenshot: async ({ path, selector }) => {
    const target = selector ? page.locator(selector) : page;
    await target.screenshot({ path, animations: "disabled" });
    return path;
  },
  errors: () => errors.splice(0),
};

async function close() {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}

const reply = (message) => process.stdout.write(JSON.stringify(message) + "\n");
reply({ id: 0, ok: true, value: { version: context.browser()?.version() ?? null } });

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const { id, op, ...args } = JSON.parse(line);
  if (op === "close") break;
  try {
    const value = await ops[op](args);
    reply({ id, ok: true, value: value === undefined ? null : value });
  } catch (err) {
    reply({ id, ok: false, error: String(err && err.message ? err.message : err) });
  }
}
await close();
process.exit(0);
