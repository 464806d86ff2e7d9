"""The one page of `mm serve`: self-contained HTML (inline style and script, no external asset). A file input
for the kinds the server answers, an optional question, a submit button; the script posts the form to
/api/ask and shows the answer in #answer or the refusal in #error (clearing the other). `body[data-state]` is
`idle`, `working`, `answered` or `failed`, so a test (or a user) can tell when a reply has come."""

from __future__ import annotations

import html
from collections.abc import Sequence

from mm.app.serve_assistant import EXTENSIONS, VERB

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
form { display: grid; gap: 0.8rem; }
#answer { font-size: 1.3rem; white-space: pre-wrap; }
#error { color: #b00020; white-space: pre-wrap; }
#status { color: #666; }
"""

SCRIPT = """
const form = document.getElementById("ask");
const answer = document.getElementById("answer");
const error = document.getElementById("error");
const status = document.getElementById("status");
const button = document.getElementById("submit");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  answer.textContent = ""; error.textContent = "";
  if (!form.file.files.length) {
    error.textContent = "choose a file first"; document.body.dataset.state = "failed"; return;
  }
  document.body.dataset.state = "working"; status.textContent = "working…"; button.disabled = true;
  try {
    const reply = await fetch("/api/ask", {method: "POST", body: new FormData(form)});
    const text = await reply.text();
    let data;
    try { data = JSON.parse(text); } catch (e) { data = {error: reply.status + " " + reply.statusText}; }
    if (reply.ok && typeof data.answer === "string") {
      answer.textContent = data.answer;
      status.textContent = data.answer ? "" : "(the model gave an empty answer)";
      document.body.dataset.state = "answered";
    } else {
      error.textContent = data.error || (reply.status + " " + reply.statusText);
      status.textContent = ""; document.body.dataset.state = "failed";
    }
  } catch (e) {
    error.textContent = "no reply from the server: " + e; status.textContent = "";
    document.body.dataset.state = "failed";
  } finally {
    button.disabled = false;
  }
});
"""


def megabytes(n: int) -> str:
    """A byte count in MB, 3 significant digits (whole MB from 1000 up), e.g. `0.0381 MB`, `3072 MB`."""
    x = n / 2**20
    return f"{x:.3g} MB" if x < 1000 else f"{x:.0f} MB"


def page(kinds: Sequence[str], max_upload_bytes: int) -> str:
    """The HTML page for a server that answers `kinds` and accepts requests up to `max_upload_bytes`."""
    accept = ",".join([f"{k}/*" for k in kinds] + ["." + e for k in kinds for e in EXTENSIONS[k]])
    does = "; ".join(f"it {VERB[k]} (.{', .'.join(EXTENSIONS[k])})" for k in kinds)
    limit = megabytes(max_upload_bytes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mm serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body data-state="idle">
<h1>mm</h1>
<p>Upload a file: {html.escape(does)}. Up to {html.escape(limit)} per upload.</p>
<form id="ask">
<input type="file" id="file" name="file" accept="{html.escape(accept)}">
<input type="text" id="question" name="question" placeholder="question (optional)">
<button type="submit" id="submit">Ask</button>
</form>
<p id="status"></p>
<p id="answer"></p>
<p id="error"></p>
<script>{SCRIPT}</script>
</body></html>
"""
