// Renders /openapi.json: every path and method with its request body, its
// answers by status and content type, the SSE events of streamed answers
// (the x-sse-events extension), and every schema with its properties.
"use strict";

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

// Descriptions use `backticks` for code, as in Markdown.
function md(text) {
  return (text || "").split("`").map((part, index) => (index % 2 ? h("code", {}, part) : part));
}

const refName = (ref) => ref.split("/").pop();
const schemaLink = (name) => h("a", { href: `#schema-${name}` }, h("code", {}, name));

function constraints(schema) {
  const parts = [];
  const names = {
    minimum: "≥", maximum: "≤", exclusiveMinimum: ">", exclusiveMaximum: "<",
    minLength: "min length", maxLength: "max length", minItems: "min items",
    maxItems: "max items", maxProperties: "max keys", pattern: "pattern",
  };
  for (const [key, label] of Object.entries(names)) {
    if (key in schema) parts.push(`${label} ${schema[key]}`);
  }
  return parts.length ? ` (${parts.join(", ")})` : "";
}

// A schema as an inline description: links for $refs, unions joined with "|".
function typeOf(schema) {
  if (!schema || Object.keys(schema).length === 0) return [h("code", {}, "any")];
  if (schema.$ref) return [schemaLink(refName(schema.$ref))];
  const union = schema.anyOf || schema.oneOf;
  if (union) {
    const out = [];
    union.forEach((item, index) => {
      if (index) out.push(" | ");
      out.push(...typeOf(item));
    });
    return out;
  }
  if ("const" in schema) return [h("code", {}, JSON.stringify(schema.const))];
  if (schema.enum) return [h("code", {}, schema.enum.map((v) => JSON.stringify(v)).join(" | "))];
  if (schema.type === "array") return [h("code", {}, "array of "), ...typeOf(schema.items), constraints(schema)];
  if (schema.type === "object" && schema.additionalProperties && typeof schema.additionalProperties === "object") {
    return [h("code", {}, "object of "), ...typeOf(schema.additionalProperties), constraints(schema)];
  }
  return [h("code", {}, schema.type || "any"), constraints(schema)];
}

function propertiesTable(schema) {
  const props = schema.properties || {};
  const required = new Set(schema.required || []);
  if (!Object.keys(props).length) return null;
  return h(
    "table",
    {},
    h("tr", {}, h("th", {}, "field"), h("th", {}, "type"), h("th", {}, "default"), h("th", {}, "description")),
    ...Object.entries(props).map(([name, prop]) =>
      h(
        "tr",
        {},
        h("td", {}, h("code", {}, name), required.has(name) ? h("span", { class: "req" }, " required") : null),
        h("td", {}, ...typeOf(prop)),
        h("td", {}, "default" in prop ? h("code", {}, JSON.stringify(prop.default)) : ""),
        h("td", { class: "desc" }, ...md(prop.description)),
      ),
    ),
  );
}

function contentRows(content) {
  return Object.entries(content || {}).map(([type, media]) => {
    const cells = [h("code", {}, type), ": ", ...typeOf(media.schema)];
    const events = media["x-sse-events"];
    if (events) {
      cells.push(
        h(
          "table",
          {},
          h("tr", {}, h("th", {}, "event"), h("th", {}, "data"), h("th", {}, "")),
          ...Object.entries(events).map(([name, event]) =>
            h("tr", {}, h("td", {}, h("code", {}, name)), h("td", {}, ...typeOf(event.schema)), h("td", { class: "desc" }, ...md(event.description))),
          ),
        ),
      );
    }
    return h("div", {}, ...cells);
  });
}

function operation(path, method, op) {
  const section = h(
    "section",
    { id: `op-${method}-${path}` },
    h("h2", {}, h("span", { class: `method ${method}` }, method.toUpperCase()), h("span", { class: "path" }, path)),
    h("p", {}, h("strong", {}, op.summary || "")),
    op.description ? h("p", { class: "desc" }, ...md(op.description)) : null,
  );
  if (op.security) section.append(h("p", { class: "desc" }, "API key: Authorization: Bearer KEY or X-API-Key, when the server has keys."));
  if (op.requestBody) {
    section.append(h("h3", {}, "Request body"), ...contentRows(op.requestBody.content));
  }
  section.append(h("h3", {}, "Responses"));
  const rows = Object.entries(op.responses || {}).map(([status, response]) =>
    h("tr", {}, h("td", {}, h("code", {}, status)), h("td", {}, ...md(response.description), ...contentRows(response.content))),
  );
  section.append(h("table", {}, h("tr", {}, h("th", {}, "status"), h("th", {}, "answer")), ...rows));
  return section;
}

function schemaSection(name, schema) {
  const section = h("section", { id: `schema-${name}` }, h("h2", {}, h("code", {}, name)));
  if (schema.description) section.append(h("p", { class: "desc" }, ...md(schema.description)));
  const table = propertiesTable(schema);
  if (table) section.append(table);
  else section.append(h("p", {}, ...typeOf(schema)));
  for (const branch of schema.oneOf || []) {
    const table = propertiesTable(branch);
    if (table) section.append(h("h3", {}, branch.description || "variant"), table);
  }
  return section;
}

async function render() {
  const root = document.getElementById("docs");
  let doc;
  try {
    doc = await (await fetch("/openapi.json")).json();
  } catch (err) {
    root.replaceChildren(h("p", { class: "error" }, `cannot load /openapi.json: ${err}`));
    return;
  }
  const ops = [];
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) ops.push(operation(path, method, op));
  }
  const schemas = Object.entries(doc.components.schemas).map(([name, schema]) => schemaSection(name, schema));
  root.replaceChildren(
    h("section", {}, h("h2", {}, `${doc.info.title} ${doc.info.version}`), h("p", {}, ...md(doc.info.description)), h("p", { class: "desc" }, `OpenAPI ${doc.openapi}`),
      h("nav", { class: "toc" }, ...Object.keys(doc.paths).map((path) => h("a", { href: `#op-${Object.keys(doc.paths[path])[0]}-${path}` }, h("code", {}, path))))),
    ...ops,
    h("h2", {}, "Schemas"),
    ...schemas,
  );
  document.body.setAttribute("data-ready", "true");
}

document.addEventListener("DOMContentLoaded", render);
