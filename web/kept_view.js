/* What SnapKV kept, drawn in the browser: the prompt with each token shaded by how many (layer, kv head) pairs
   kept it, and a layers x positions heatmap, with the KV memory kept against the full cache's. One renderer for
   both the live page (web/page.js) and the static file that `snapkv-run --show-kept` writes (kept_view.py inlines
   this file and the kept JSON into it), so the two always draw the same thing.

   The input is the JSON that kept_view.kept_data builds (the server sends it as `snapkv.kept`):
     {prompt_tokens, layers, kv_heads, tokens: [text of each prompt token], runs, kv_bytes, full_kv_bytes, ...}
   where runs[layer][kv_head] lists the kept positions as half-open [start, end) runs. */
"use strict";

const KeptView = (() => {
  // magma-like ramp for the heatmap: share 0 is the darkest stop, share 1 the lightest
  const MAX_COLUMNS = 8192;  // past this many positions a heatmap column shows the mean of several (canvas limits)
  const RAMP = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                [250, 193, 39], [252, 253, 191]];

  /* Per prompt position, how many (layer, kv head) pairs kept it (count), and per layer how many kv heads did
     (byLayer, layers x positions, row-major); entries: kept entries over all rows. */
  function tally(data) {
    const T = data.prompt_tokens, L = data.layers;
    const count = new Uint32Array(T), byLayer = new Uint16Array(L * T);
    let entries = 0;
    data.runs.forEach((heads, layer) => {
      for (const runs of heads) {
        for (const [start, end] of runs) {
          for (let p = start; p < end; p++) {
            count[p]++;
            byLayer[layer * T + p]++;
          }
          entries += end - start;
        }
      }
    });
    return {count, byLayer, entries};
  }

  function color(share) {
    const x = Math.min(Math.max(share, 0), 1) * (RAMP.length - 1), i = Math.min(Math.floor(x), RAMP.length - 2);
    const f = x - i;
    return RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
  }

  function formatBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return `${i ? n.toFixed(2) : n} ${units[i]}`;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function summary(data, entries) {
    const rows = data.layers * data.kv_heads, perRow = entries / rows, T = data.prompt_tokens;
    const parts = [`${T} prompt tokens`,
                   `${perRow.toFixed(perRow % 1 ? 1 : 0)} kept per layer and kv head on average ` +
                   `(${(T / perRow).toFixed(2)}x compression)`,
                   `${data.layers} layers × ${data.kv_heads} kv heads`];
    if (data.kv_bytes != null && data.full_kv_bytes != null) {
      parts.push(`KV memory ${formatBytes(data.kv_bytes)} kept against ${formatBytes(data.full_kv_bytes)} with ` +
                 `the full cache (${(data.full_kv_bytes / data.kv_bytes).toFixed(2)}x less, the answer included)`);
    }
    return parts.join(" · ");
  }

  function tokens(data, count) {
    const rows = data.layers * data.kv_heads, box = el("div", "kept-prompt");
    data.tokens.forEach((piece, pos) => {
      const share = count[pos] / rows, span = el("span", "kept-token", piece.replace(/\n/g, "\u21b5\n"));
      span.dataset.pos = pos;
      span.dataset.kept = count[pos];
      span.style.background = `rgba(255, 140, 0, ${share.toFixed(3)})`;
      span.title = `position ${pos}: kept by ${count[pos]} of ${rows} (layer, kv head) pairs ` +
                   `(${Math.round(share * 100)}%)`;
      box.append(span);
    });
    return box;
  }

  function heatmap(data, byLayer) {
    const T = data.prompt_tokens, L = data.layers, H = data.kv_heads;
    const columns = Math.min(T, MAX_COLUMNS), span = T / columns;
    const figure = el("figure", "kept-heatmap");
    const canvas = el("canvas");
    canvas.width = columns;
    canvas.height = L;
    canvas.style.height = `${Math.max(120, Math.min(L * 8, 320))}px`;
    const ctx = canvas.getContext("2d"), image = ctx.createImageData(columns, L);
    const shades = Array.from({length: H + 1}, (_, k) => color(k / H));
    for (let layer = 0; layer < L; layer++) {
      for (let x = 0; x < columns; x++) {
        const first = Math.floor(x * span), last = Math.max(first + 1, Math.floor((x + 1) * span));
        let heads = 0;
        for (let p = first; p < last; p++) heads += byLayer[layer * T + p];
        const [r, g, b] = last - first === 1 ? shades[heads] : color(heads / (last - first) / H);
        image.data.set([r, g, b, 255], (layer * columns + x) * 4);
      }
    }
    ctx.putImageData(image, 0, 0);
    const readout = el("figcaption", "kept-readout",
                       `layers 0 (top) to ${L - 1} (bottom) × prompt positions 0 to ${T - 1}; ` +
                       `brighter: more of a layer's ${H} kv heads kept the position`);
    const idle = readout.textContent;
    canvas.addEventListener("mousemove", (e) => {
      const box = canvas.getBoundingClientRect();
      const pos = Math.min(T - 1, Math.floor((e.clientX - box.left) / box.width * T));
      const layer = Math.min(L - 1, Math.floor((e.clientY - box.top) / box.height * L));
      readout.textContent = `layer ${layer}, position ${pos} (${JSON.stringify(data.tokens[pos])}): kept by ` +
                            `${byLayer[layer * T + pos]} of ${H} kv heads`;
    });
    canvas.addEventListener("mouseleave", () => { readout.textContent = idle; });
    const legend = el("div", "kept-legend");
    for (let k = 0; k <= H; k++) {
      const swatch = el("span", "kept-swatch", `${k}/${H}`);
      const [r, g, b] = shades[k];
      swatch.style.background = `rgb(${r}, ${g}, ${b})`;
      swatch.style.color = k / H > 0.6 ? "#000" : "#fff";
      legend.append(swatch);
    }
    figure.append(canvas, readout, legend);
    return figure;
  }

  /* Draw `data` into `container` (its content is replaced). */
  function render(container, data) {
    const {count, byLayer, entries} = tally(data);
    const legend = el("p", "kept-legend", "share of (layer, kv head) pairs that kept a token: ");
    for (const share of [0, 0.25, 0.5, 0.75, 1]) {
      const swatch = el("span", "kept-swatch", `${share * 100}%`);
      swatch.style.background = `rgba(255, 140, 0, ${share})`;
      legend.append(swatch);
    }
    container.replaceChildren(el("p", "kept-summary", summary(data, entries)), legend, tokens(data, count),
                              el("h3", "", "Layers × positions"), heatmap(data, byLayer));
    container.dataset.promptTokens = data.prompt_tokens;
    container.dataset.entries = entries;
  }

  return {render, tally, color, formatBytes};
})();
