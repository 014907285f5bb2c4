// The playground's code editor: CodeMirror 6 with Python and JSON, exposed to
// streamsvc/web/static/app.js as window.StreamsvcEditor.create(parent, options).
// Bundled by build.mjs into streamsvc/web/static/editor.js (scripts/build-editor).
import { closeBrackets, closeBracketsKeymap } from "@codemirror/autocomplete";
import { defaultKeymap, history, historyKeymap, indentWithTab } from "@codemirror/commands";
import { json } from "@codemirror/lang-json";
import { python } from "@codemirror/lang-python";
import {
  bracketMatching,
  defaultHighlightStyle,
  foldGutter,
  foldKeymap,
  indentOnInput,
  indentUnit,
  syntaxHighlighting,
} from "@codemirror/language";
import { highlightSelectionMatches, search, searchKeymap } from "@codemirror/search";
import { EditorState } from "@codemirror/state";
import {
  drawSelection,
  EditorView,
  highlightActiveLine,
  highlightActiveLineGutter,
  highlightSpecialChars,
  keymap,
  lineNumbers,
} from "@codemirror/view";

const LANGUAGES = { python: () => python(), json: () => json(), text: () => [] };

const theme = EditorView.theme({
  "&": { fontSize: "12.5px", border: "1px solid var(--line, #d9dde5)", borderRadius: "6px", background: "#fff" },
  "&.cm-focused": { outline: "2px solid var(--accent, #2f5fd0)", outlineOffset: "-1px" },
  ".cm-scroller": { fontFamily: "var(--mono, monospace)", lineHeight: "1.4" },
  ".cm-gutters": { background: "#f5f6f8", borderRight: "1px solid var(--line, #d9dde5)" },
});

// Pick the language from a file name: .py is Python, .json JSON, anything else plain text.
export function languageFor(name) {
  if (/\.py$/i.test(name)) return "python";
  if (/\.json$/i.test(name)) return "json";
  return "text";
}

// The page's style nonce (<meta name="style-nonce">): CodeMirror's styles go in a <style>
// element, which a Content-Security-Policy without 'unsafe-inline' admits only with it.
function styleNonce() {
  return document.querySelector('meta[name="style-nonce"]')?.content || null;
}

// A new editor in `parent`; onChange(text) after every edit of the document.
export function create(parent, { doc = "", language = "text", onChange = null, minLines = 8 } = {}) {
  const nonce = styleNonce();
  const listener = EditorView.updateListener.of((update) => {
    if (update.docChanged && onChange) onChange(update.state.doc.toString());
  });
  const view = new EditorView({
    parent,
    state: EditorState.create({
      doc,
      extensions: [
        lineNumbers(),
        highlightActiveLineGutter(),
        highlightSpecialChars(),
        history(),
        foldGutter(),
        drawSelection(),
        indentOnInput(),
        indentUnit.of("    "),
        syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
        bracketMatching(),
        closeBrackets(),
        highlightActiveLine(),
        highlightSelectionMatches(),
        search({ top: true }),
        keymap.of([
          ...closeBracketsKeymap,
          ...defaultKeymap,
          ...searchKeymap,
          ...historyKeymap,
          ...foldKeymap,
          indentWithTab,
        ]),
        (LANGUAGES[language] || LANGUAGES.text)(),
        theme,
        EditorView.theme({ ".cm-content, .cm-gutter": { minHeight: `${minLines * 1.4}em` } }),
        listener,
        nonce ? EditorView.cspNonce.of(nonce) : [],
      ],
    }),
  });
  return {
    view,
    getValue: () => view.state.doc.toString(),
    setValue: (text) => view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text } }),
    focus: () => view.focus(),
    destroy: () => view.destroy(),
  };
}
