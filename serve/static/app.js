// The web page: translate with /v1/translate or /v1/translate/stream, show the n-best list and
// draw the attention matrix the API returns. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { auth: false, maxChars: 1000, maxTexts: 64, maxBeam: 16, busy: false };

function apiKey() {
  return $("api-key").value.trim();
}

function headers() {
  const h = { "Content-Type": "application/json", Accept: "application/json" };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${body.error.message} (HTTP ${response.status})`;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

async function loadModel() {
  const r = await fetch("/v1/model", { headers: headers() });
  if (r.status === 401) {
    state.auth = true;
    $("auth-panel").hidden = false;
    $("model-line").textContent = "Enter the API key to use this server.";
    return;
  }
  if (r.status === 503) {
    $("model-line").textContent = "The model is loading…";
    setTimeout(loadModel, 1000);
    return;
  }
  if (!r.ok) {
    $("model-line").textContent = await errorMessage(r);
    return;
  }
  const info = await r.json();
  state.auth = info.auth;
  state.maxChars = info.limits.max_chars;
  state.maxTexts = info.limits.max_texts;
  state.maxBeam = info.limits.max_beam_size;
  $("auth-panel").hidden = !info.auth;
  $("beam-size").max = state.maxBeam;
  $("n-best").max = state.maxBeam;
  $("beam-size").value = Math.min(Math.max(info.default_beam_size, 1), state.maxBeam);
  $("n-best").value = Math.min(3, $("beam-size").value);
  const bleu = info.scores && (info.scores.bleu ?? info.scores.dev_bleu ?? info.scores.test_bleu);
  const params = info.parameters && info.parameters.total;
  const parts = [`${info.src_lang} → ${info.tgt_lang}`, info.name];
  if (params) parts.push(`${(params / 1e6).toFixed(params < 1e6 ? 2 : 1)}M parameters`);
  if (typeof bleu === "number") parts.push(`BLEU ${bleu.toFixed(1)}`);
  $("model-line").textContent = parts.join(" · ");
  $("source-label").firstChild.textContent = `Source text (${info.src_lang}) `;
}

function sourceLines() {
  return $("source").value.split(/\r?\n/).map((s) => s.trim()).filter((s) => s.length > 0);
}

function options() {
  const beam = Math.max(1, parseInt($("beam-size").value, 10) || 1);
  const nBest = Math.min(beam, Math.max(1, parseInt($("n-best").value, 10) || 1));
  const opts = { beam_size: beam, n_best: nBest, return_alignments: $("alignments").checked };
  const prefix = $("prefix").value;
  if (prefix.trim().length > 0) opts.target_prefix = prefix;
  return opts;
}

// one prefix per line: the "starts with" box applies to every line
function withPrefixes(opts, lines) {
  if (opts.target_prefix === undefined) return opts;
  return { ...opts, target_prefix: lines.map(() => opts.target_prefix) };
}

function makeCard(source) {
  const node = $("result-template").content.firstElementChild.cloneNode(true);
  node.querySelector(".source-text").textContent = source;
  node.querySelector(".nbest-box").hidden = true;
  node.querySelector(".attention-box").hidden = true;
  $("output").appendChild(node);
  return node;
}

function fillCard(card, t) {
  card.querySelector(".translation-text").classList.remove("streaming");
  card.querySelector(".translation-text").textContent = t.text;
  const meta = [];
  if (typeof t.score === "number") meta.push(`score ${t.score.toFixed(3)}`);
  if (typeof t.confidence === "number") meta.push(`confidence ${Math.round(100 * t.confidence)}%`);
  if (t.finished === false) meta.push("cut at the maximum length");
  card.querySelector(".meta").textContent = meta.join(" · ");
  const list = card.querySelector(".nbest");
  list.replaceChildren();
  for (const h of t.n_best || []) {
    const li = document.createElement("li");
    li.textContent = h.text;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = typeof h.score === "number" ? h.score.toFixed(3) : "";
    li.appendChild(score);
    list.appendChild(li);
  }
  card.querySelector(".nbest-box").hidden = (t.n_best || []).length < 2;
  const a = t.alignment;
  if (a && a.attention && a.attention.length) {
    card.querySelector(".attention-box").hidden = false;
    drawHeatmap(card.querySelector(".heatmap"), card.querySelector(".heatmap-hover"), a);
  }
}

// Rows are target subwords, columns source subwords; darker is more attention.
function drawHeatmap(canvas, hover, alignment) {
  const src = alignment.src_tokens;
  const tgt = alignment.tgt_tokens;
  const matrix = alignment.attention;
  const ctx = canvas.getContext("2d");
  const font = "12px system-ui, sans-serif";
  ctx.font = font;
  const width = (list) => Math.max(20, ...list.map((s) => ctx.measureText(s).width));
  const cell = Math.max(16, Math.min(30, Math.floor(640 / Math.max(src.length, 1))));
  const left = Math.ceil(width(tgt)) + 10;
  const top = Math.ceil(width(src)) + 10;
  const dpr = window.devicePixelRatio || 1;
  const w = left + cell * src.length + 4;
  const h = top + cell * matrix.length + 4;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  canvas.style.width = w + "px";
  canvas.style.height = h + "px";
  ctx.scale(dpr, dpr);
  ctx.font = font;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, w, h);
  for (let t = 0; t < matrix.length; t++) {
    for (let s = 0; s < src.length; s++) {
      const v = Math.max(0, Math.min(1, matrix[t][s] || 0));
      const shade = Math.round(255 - v * 200);
      ctx.fillStyle = `rgb(${shade}, ${Math.round(255 - v * 160)}, 255)`;
      ctx.fillRect(left + s * cell, top + t * cell, cell - 1, cell - 1);
    }
  }
  ctx.fillStyle = "#1d2330";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  tgt.forEach((tok, t) => ctx.fillText(tok, left - 6, top + t * cell + cell / 2));
  src.forEach((tok, s) => {
    ctx.save();
    ctx.translate(left + s * cell + cell / 2, top - 6);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(tok, 0, 0);
    ctx.restore();
  });
  canvas.onmousemove = (ev) => {
    const rect = canvas.getBoundingClientRect();
    const s = Math.floor((ev.clientX - rect.left - left) / cell);
    const t = Math.floor((ev.clientY - rect.top - top) / cell);
    if (s >= 0 && s < src.length && t >= 0 && t < matrix.length) {
      hover.textContent = `${tgt[t]} ← ${src[s]}: ${(matrix[t][s] || 0).toFixed(3)}`;
    } else {
      hover.textContent = "";
    }
  };
}

async function translatePlain(lines, cards) {
  const r = await fetch("/v1/translate", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ text: lines, ...withPrefixes(options(), lines) }),
  });
  if (!r.ok) throw new Error(await errorMessage(r));
  const body = await r.json();
  body.translations.forEach((t, i) => fillCard(cards[i], t));
  return body.request_id;
}

// POST + Server-Sent Events: EventSource only does GET, so read the body stream and split events.
async function translateStream(lines, cards) {
  const opts = options();
  if (lines.length === 1 && !opts.return_alignments) {
    opts.beam_size = 1; // token-by-token streaming is greedy
    opts.n_best = 1;
  }
  const r = await fetch("/v1/translate/stream", {
    method: "POST",
    headers: { ...headers(), Accept: "text/event-stream" },
    body: JSON.stringify({ text: lines, ...withPrefixes(opts, lines) }),
  });
  if (!r.ok) throw new Error(await errorMessage(r));
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let requestId = r.headers.get("X-Request-ID");
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const raw = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      let data = "";
      for (const line of raw.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      const payload = data ? JSON.parse(data) : {};
      if (event === "token") {
        const el = cards[payload.index].querySelector(".translation-text");
        el.textContent = payload.text;
        el.classList.add("streaming");
      } else if (event === "translation") {
        fillCard(cards[payload.index], payload);
      } else if (event === "error") {
        throw new Error(payload.error.message);
      } else if (event === "done") {
        requestId = payload.request_id;
      }
    }
  }
  return requestId;
}

async function translate() {
  if (state.busy) return;
  const lines = sourceLines();
  if (!lines.length) {
    setStatus("Type something to translate.", true);
    return;
  }
  if (lines.length > state.maxTexts) {
    setStatus(`At most ${state.maxTexts} lines at once.`, true);
    return;
  }
  const tooLong = lines.findIndex((l) => l.length > state.maxChars);
  if (tooLong >= 0) {
    setStatus(`Line ${tooLong + 1} is longer than ${state.maxChars} characters.`, true);
    return;
  }
  if ($("remember-key").checked) localStorage.setItem("nmt-api-key", apiKey());
  state.busy = true;
  $("translate").disabled = true;
  $("output").replaceChildren();
  const cards = lines.map(makeCard);
  setStatus("Translating…");
  const started = performance.now();
  try {
    const id = $("stream").checked
      ? await translateStream(lines, cards)
      : await translatePlain(lines, cards);
    const ms = Math.round(performance.now() - started);
    setStatus(`Done in ${ms} ms · request ${id || ""}`);
    if (state.auth && !$("model-line").textContent.includes("→")) loadModel();
  } catch (err) {
    setStatus(err.message || String(err), true);
  } finally {
    state.busy = false;
    $("translate").disabled = false;
  }
}

function updateCount() {
  const n = $("source").value.length;
  $("char-count").textContent = n ? `${n} characters` : "";
}

window.addEventListener("DOMContentLoaded", () => {
  const saved = localStorage.getItem("nmt-api-key");
  if (saved) {
    $("api-key").value = saved;
    $("remember-key").checked = true;
  }
  $("translate").addEventListener("click", translate);
  $("source").addEventListener("input", updateCount);
  $("source").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      translate();
    }
  });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
});

// -- live mode: simultaneous translation over the /v1/translate/live WebSocket ----------------
// The source box is sent as it is typed; the server commits target words once the wait-k policy
// writes them and never revises them. Enter (or Translate) ends the sentence; editing text that
// was already sent starts the sentence again.
const live = { ws: null, sent: "", base: 0 }; // base: where the current sentence starts in the box

function liveSend(ws, frame) {
  if (ws.liveReady) ws.send(JSON.stringify(frame));
  else ws.liveQueue.push(frame); // sent once the server says ready
}

function liveOpen() {
  liveClose();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/v1/translate/live`);
  live.ws = ws;
  live.sent = "";
  ws.liveReady = false;
  ws.liveQueue = [];
  $("live-output").textContent = "";
  $("live-read").textContent = "";
  ws.onopen = () => {
    const k = parseInt($("live-k").value, 10) || 3;
    ws.send(JSON.stringify({ type: "start", k, api_key: apiKey() || undefined }));
  };
  ws.onmessage = (ev) => {
    const frame = JSON.parse(ev.data);
    if (frame.type === "ready") {
      ws.liveReady = true;
      $("live-k").value = frame.k;
      setStatus(`Live: wait-${frame.k}`);
      for (const queued of ws.liveQueue.splice(0)) ws.send(JSON.stringify(queued));
    } else if (frame.type === "words") {
      const out = $("live-output");
      out.textContent = (out.textContent ? out.textContent + " " : "") + frame.text;
      $("live-read").textContent = `(${frame.source_words} source words read)`;
    } else if (frame.type === "done") {
      $("live-output").textContent = frame.text;
      $("live-read").textContent = `(done: ${frame.source_words} source words)`;
      if (ws !== live.ws) ws.close(); // an ended sentence's connection
    } else if (frame.type === "error") {
      setStatus(`${frame.error.message} (${frame.error.code})`, true);
    }
  };
  ws.onclose = () => {
    if (live.ws === ws) live.ws = null;
  };
}

function liveClose() {
  if (live.ws) live.ws.close();
  live.ws = null;
}

function liveInput() {
  const box = $("source").value;
  if (box.length < live.base) live.base = 0; // the box was cleared or cut: start from its top
  const text = box.slice(live.base);
  if (!live.ws || !text.startsWith(live.sent)) {
    liveOpen(); // the first keystroke, or an edit of text already sent: start again
  }
  const more = text.slice(live.sent.length);
  if (more) {
    liveSend(live.ws, { type: "text", text: more });
    live.sent = text;
  }
}

function liveEnd() {
  if (live.ws) liveSend(live.ws, { type: "end" });
  live.sent = "";
  live.base = $("source").value.length;
  live.ws = null; // the next keystroke opens a new sentence; this one gets its done frame
}

window.addEventListener("DOMContentLoaded", () => {
  $("live").addEventListener("change", () => {
    const on = $("live").checked;
    $("live-panel").hidden = !on;
    $("live-k-label").hidden = !on;
    $("stream").disabled = on;
    if (!on) liveClose();
    else if ($("source").value) liveInput();
  });
  $("live-k").addEventListener("change", () => {
    if ($("live").checked) liveOpen();
  });
  $("source").addEventListener("input", () => {
    if ($("live").checked) liveInput();
  });
  $("source").addEventListener("keydown", (ev) => {
    if ($("live").checked && ev.key === "Enter" && !ev.shiftKey && !ev.ctrlKey) {
      ev.preventDefault();
      liveEnd();
    }
  });
});
