/* The chat page at /: a document and questions go to /v1/chat/completions as one conversation (the document opens
   it), answers stream in over server-sent events, and after each answer the kept view (kept_view.js) shows what
   the cache kept, from the `snapkv.kept` field the request asks for with `"return_kept": true`. Compare sends
   the same question twice, full cache and SnapKV, and sets the answers side by side. Every failure (a refused
   request, a server error, a broken connection) shows in the #error banner; none is only logged. */
"use strict";

const $ = (id) => document.getElementById(id);
const state = {messages: [], controller: null};

class RequestError extends Error {}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function headers() {
  const h = {"content-type": "application/json"}, key = $("api-key").value.trim();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

function wholeNumber(id) {
  const value = Number($(id).value);
  if ($(id).value.trim() === "" || !Number.isInteger(value)) {
    throw new RequestError(`${$(id).labels[0].textContent} must be a whole number (got "${$(id).value}")`);
  }
  return value;
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

/* The request body: the chat API's fields plus this server's "snapkv" (false: the full cache) and
   "return_kept" extensions. */
function requestBody(messages, cacheMode) {
  const snapkv = cacheMode === "full" ? false :
    {budget: wholeNumber("budget"), window: wholeNumber("window"), policy: $("policy").value};
  return {messages, stream: true, max_tokens: wholeNumber("max-tokens"), temperature: Number($("temperature").value),
          snapkv, return_kept: true};
}

async function errorMessage(response) {
  let detail = response.statusText || "no details";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) detail = body.error.message;
  } catch (e) { /* not JSON: the status line says what there is */ }
  return `The server answered ${response.status}: ${detail}`;
}

/* POST one streaming chat request; onText(textSoFar) after each delta. Resolves to {text, finish_reason, snapkv}
   once the stream ends with [DONE]; throws RequestError with a message for people otherwise. */
async function streamChat(payload, onText, signal) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
                                                    body: JSON.stringify(payload), signal});
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new RequestError(`Could not reach the server (${e.message}): is snapkv-serve still running?`);
  }
  if (!response.ok) throw new RequestError(await errorMessage(response));
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "", final = null, finished = false;
  while (!finished) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new RequestError(`The connection broke while the answer streamed (${e.message})`);
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, {stream: true});
    let cut;
    while (!finished && (cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const obj = JSON.parse(data);
      if (obj.error) throw new RequestError(`The request failed on the server: ${obj.error.message}`);
      const choice = obj.choices && obj.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        text += choice.delta.content;
        onText(text);
      }
      if (choice.finish_reason) final = {finish_reason: choice.finish_reason, snapkv: obj.snapkv};
    }
  }
  if (!finished || !final) throw new RequestError("The answer stream ended before the server finished it");
  return {text, ...final};
}

function addMessage(role, text, note) {
  const box = document.createElement("div"), body = document.createElement("div");
  box.className = `message ${role}`;
  body.className = "text";
  body.textContent = text;
  box.append(body);
  if (note) {
    const small = document.createElement("div");
    small.className = "note";
    small.textContent = note;
    box.append(small);
  }
  $("chat").append(box);
  box.scrollIntoView({block: "nearest"});
  return box;
}

function setNote(box, text) {
  let note = box.querySelector(".note");
  if (!note) {
    note = document.createElement("div");
    note.className = "note";
    box.append(note);
  }
  note.textContent = text;
}

function describeAnswer(info) {
  if (!info) return "";
  const parts = [`${info.prompt_tokens} prompt tokens`];
  if (info.kept_tokens != null) parts.push(`${info.kept_tokens} kept per layer and kv head`);
  if (info.kv_bytes != null && info.full_kv_bytes != null) {
    parts.push(`KV ${KeptView.formatBytes(info.kv_bytes)} of ${KeptView.formatBytes(info.full_kv_bytes)} full`);
  }
  return parts.join(" · ");
}

function showKept(info) {
  if (info && info.kept) {
    KeptView.render($("kept"), info.kept);
  } else {
    showError("The server sent no kept data with the answer (is it an older snapkv-serve?)");
  }
}

function setBusy(busy) {
  state.controller = busy ? new AbortController() : null;
  $("send").disabled = $("compare").disabled = $("new-chat").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.busy = busy ? "true" : "false";
}

function lockDocument(locked) {
  $("document").readOnly = locked;
  $("file").disabled = locked;
  $("document-info").textContent = locked ? "in the conversation (New chat to change it)" :
    `${$("document").value.length} characters`;
}

/* The next user message: the first one carries the document, then a blank line, then the question. */
function nextMessages(question) {
  const doc = $("document").value.trimEnd();
  const content = state.messages.length === 0 && doc.trim() ? `${doc}\n\n${question}` : question;
  return [...state.messages, {role: "user", content}];
}

function takeQuestion() {
  const question = $("question").value.trim();
  if (!question) throw new RequestError("Type a question first");
  return question;
}

async function ask() {
  clearError();
  let question, payload, messages;
  try {
    question = takeQuestion();
    messages = nextMessages(question);
    payload = requestBody(messages, mode());
  } catch (e) {
    return showError(e.message);
  }
  const withDocument = state.messages.length === 0 && $("document").value.trim() !== "";
  addMessage("user", question, withDocument ? "(after the document)" : "");
  const answer = addMessage("assistant", "");
  answer.dataset.state = "streaming";
  $("question").value = "";
  setBusy(true);
  try {
    const result = await streamChat(payload, (text) => { answer.querySelector(".text").textContent = text; },
                                    state.controller.signal);
    state.messages = [...messages, {role: "assistant", content: result.text}];
    answer.dataset.state = "done";
    answer.dataset.finish = result.finish_reason;
    setNote(answer, describeAnswer(result.snapkv));
    lockDocument(true);
    showKept(result.snapkv);
  } catch (e) {
    answer.dataset.state = "failed";
    $("question").value = question;  // to send again; the turn is not part of the conversation
    if (e.name === "AbortError") {
      setNote(answer, "stopped: this turn is not part of the conversation");
    } else {
      setNote(answer, "failed: this turn is not part of the conversation");
      showError(e.message);
    }
  } finally {
    setBusy(false);
  }
}

/* How many answer tokens are equal at the same index (over the longer answer), and how long the common
   prefix is: the measures snapkv-run --compare prints. */
function shared(a, b) {
  const n = Math.max(a.length, b.length);
  let matched = 0, prefix = -1;
  for (let i = 0; i < n; i++) {
    if (i < a.length && i < b.length && a[i] === b[i]) matched++;
    else if (prefix < 0) prefix = i;
  }
  return {matched, compared: n, prefix: prefix < 0 ? n : prefix};
}

async function compare() {
  clearError();
  let question, messages, payloads;
  try {
    question = takeQuestion();
    messages = nextMessages(question);
    payloads = [requestBody(messages, "full"), requestBody(messages, "snapkv")];
  } catch (e) {
    return showError(e.message);
  }
  const columns = [$("compare-full"), $("compare-snapkv")], summary = $("compare-summary");
  $("compare-view").hidden = false;
  summary.textContent = "answering…";
  delete summary.dataset.matched;
  for (const column of columns) {
    column.querySelector(".answer").textContent = "";
    column.querySelector(".stats").textContent = "";
    column.dataset.state = "streaming";
  }
  columns[1].querySelector("h3").textContent = `SnapKV (${payloads[1].snapkv.policy}, budget ` +
                                               `${payloads[1].snapkv.budget}, window ${payloads[1].snapkv.window})`;
  setBusy(true);
  const signal = state.controller.signal;
  try {
    const results = await Promise.all(payloads.map((payload, i) => streamChat(
      payload, (text) => { columns[i].querySelector(".answer").textContent = text; }, signal)));
    results.forEach((result, i) => {
      columns[i].dataset.state = "done";
      columns[i].querySelector(".stats").textContent = describeAnswer(result.snapkv);
    });
    const [full, snap] = results.map((r) => r.snapkv);
    const s = shared(full.kept.completion_token_ids, snap.kept.completion_token_ids);
    Object.assign(summary.dataset, {matched: s.matched, compared: s.compared, prefix: s.prefix});
    const verdict = s.prefix === s.compared ? "the same answer" : s.prefix === 0 ? "they differ from the first token"
      : s.prefix === 1 ? "the first token is the same" : `the first ${s.prefix} tokens are the same`;
    summary.textContent = `matched tokens: ${s.matched} of ${s.compared} at the same index (${verdict}) · KV ` +
      `memory: full cache ${KeptView.formatBytes(full.kv_bytes)}, SnapKV ${KeptView.formatBytes(snap.kv_bytes)} ` +
      `(${(full.kv_bytes / snap.kv_bytes).toFixed(2)}x less)`;
    showKept(snap);
  } catch (e) {
    state.controller.abort();  // the other answer, if it still streams
    for (const column of columns) column.dataset.state = "failed";
    summary.textContent = e.name === "AbortError" ? "stopped" : "failed";
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    setBusy(false);
  }
}

function newChat() {
  state.messages = [];
  $("chat").replaceChildren();
  $("compare-view").hidden = true;
  lockDocument(false);
  clearError();
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (!response.ok) throw new RequestError(await errorMessage(response));
    const model = (await response.json()).data[0];
    $("model-info").textContent = `${model.id} · up to ${model.max_model_len} positions`;
  } catch (e) {
    $("model-info").textContent = "model unknown";
    showError(e instanceof RequestError ? e.message : `Could not reach the server (${e.message})`);
  }
}

$("send").addEventListener("click", ask);
$("compare").addEventListener("click", compare);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", newChat);
$("error-close").addEventListener("click", clearError);
$("api-key").addEventListener("change", () => { clearError(); loadModel(); });
$("document").addEventListener("input", () => lockDocument(false));
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    if (!$("send").disabled) ask();
  }
});
$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  try {
    $("document").value = await file.text();
    lockDocument(false);
  } catch (e) {
    showError(`Could not read ${file.name}: ${e.message}`);
  }
});
window.addEventListener("error", (e) => showError(`The page hit an error: ${e.message}`));
window.addEventListener("unhandledrejection", (e) => showError(`The page hit an error: ${e.reason}`));
setBusy(false);
lockDocument(false);
loadModel();
