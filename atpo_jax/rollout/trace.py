"""Tree traces: each step's trees as JSONL and as a self-contained static HTML viewer.

``tree_records`` turns host trees (plus optional per-node values, advantages and leaf rewards from
the credit kernels) into plain dicts; ``write_trace`` writes ``trace_<step>.jsonl`` (one tree per
line) and ``trace_<step>.html``, a page with no external resources that draws every tree as SVG
(node colour = advantage) and shows a node's observation and turn text when it is clicked.
"""

from __future__ import annotations

import html
import json
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from atpo_jax.rollout.tree import Tree


def tree_records(
    trees: Sequence[Tree],
    decode: Callable[[list[int]], str],
    *,
    values: np.ndarray | None = None,
    advantages: np.ndarray | None = None,
    leaf_rewards: np.ndarray | None = None,
) -> list[dict]:
    """One dict per tree: its prompt and nodes (structure, text, entropy, score, value, advantage).

    ``values``/``advantages``/``leaf_rewards`` are [B, N] arrays indexed like the rollout batch (live
    nodes renumbered in creation order).
    """
    records = []
    for b, tree in enumerate(trees):
        live = tree.live_nodes()
        renumber = {old: new for new, old in enumerate(live)}
        last_scores = {}
        for round_scores in tree.scores:
            last_scores.update(round_scores)
        picked = {}
        for picks in tree.picks:
            for index in picks:
                picked[index] = picked.get(index, 0) + 1
        nodes = []
        for old in live:
            node = tree.nodes[old]
            new = renumber[old]
            nodes.append(
                {
                    "id": new,
                    "parent": -1 if node.parent < 0 else renumber[node.parent],
                    "depth": node.depth,
                    "is_leaf": node.is_leaf,
                    "finish": node.finish,
                    "observation": decode(node.tokens[: node.obs_len]),
                    "turn": decode(node.tokens[node.obs_len :]),
                    "generated_tokens": node.generated,
                    "entropy": node.entropy,
                    "score": last_scores.get(old),
                    "times_picked": picked.get(old, 0),
                    "branch_of": None if node.branch_of is None else renumber.get(node.branch_of),
                    "query": node.query,
                    "value": _item(values, b, new),
                    "advantage": _item(advantages, b, new),
                    "reward": _item(leaf_rewards, b, new) if node.is_leaf else None,
                }
            )
        records.append({"tree": tree.tree_id, "prompt": decode(tree.prompt), "nodes": nodes})
    return records


def _item(array: np.ndarray | None, b: int, n: int) -> float | None:
    return None if array is None else float(np.asarray(array)[b, n])


def write_trace(directory: str | pathlib.Path, step: int, records: list[dict]) -> pathlib.Path:
    """Writes ``trace_<step>.jsonl`` and ``trace_<step>.html``; returns the HTML path."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jsonl = directory / f"trace_{step:06d}.jsonl"
    with jsonl.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    page = directory / f"trace_{step:06d}.html"
    page.write_text(render_html(records, title=f"AT²PO trees, step {step}"))
    return page


def render_html(records: list[dict], title: str) -> str:
    """A self-contained page (inline CSS/JS/SVG) that draws the trees and explains clicked nodes."""
    # `</` inside the JSON would end the <script> element early: escape the slash.
    data = json.dumps(records).replace("</", "<\\/")
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }
#left { flex: 3; overflow: auto; padding: 12px; }
#right { flex: 2; overflow: auto; padding: 12px; border-left: 1px solid #ccc; background: #fafafa; }
pre { white-space: pre-wrap; word-break: break-word; background: #fff; border: 1px solid #ddd;
      padding: 8px; }
.obs { color: #777; }
svg circle { cursor: pointer; stroke: #333; stroke-width: 1; }
svg circle.selected { stroke: #000; stroke-width: 3; }
svg line { stroke: #999; }
svg text { font-size: 10px; pointer-events: none; }
</style></head>
<body><div id="left"><h2>__TITLE__</h2>
<label>Tree: <select id="pick"></select></label>
<p id="summary"></p><svg id="tree" xmlns="http://www.w3.org/2000/svg"></svg>
<p>Colour: advantage (blue &gt; 0, red &lt; 0); dashed outline = leaf. Click a node to read it.</p>
</div><div id="right"><h3>Node</h3><div id="detail">Click a node.</div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
const trees = JSON.parse(document.getElementById("data").textContent);
const pick = document.getElementById("pick");
trees.forEach((t, i) => {
  const o = document.createElement("option"); o.value = i;
  o.textContent = "tree " + t.tree + " (" + t.nodes.length + " nodes)"; pick.appendChild(o);
});
function esc(s) { return String(s).replace(/[&<>]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;"})[c]); }
function colour(a) {
  if (a === null || a === undefined) return "#ddd";
  const x = Math.max(-1, Math.min(1, a / 2)), v = Math.round(255 * (1 - Math.abs(x)));
  return x >= 0 ? `rgb(${v},${v},255)` : `rgb(255,${v},${v})`;
}
function fmt(x) { return x === null || x === undefined ? "-" : Number(x).toFixed(3); }
function draw(i) {
  const t = trees[i], svg = document.getElementById("tree"), kids = {};
  t.nodes.forEach(n => { if (n.parent >= 0) (kids[n.parent] = kids[n.parent] || []).push(n.id); });
  const x = {}, y = {}; let next = 0;
  (function place(id, d) {
    y[id] = d; const c = kids[id] || [];
    if (!c.length) { x[id] = next++; return; }
    c.forEach(k => place(k, d + 1)); x[id] = (x[c[0]] + x[c[c.length - 1]]) / 2;
  })(0, 0);
  const W = 34, H = 60, maxD = Math.max(...Object.values(y));
  svg.setAttribute("width", Math.max(200, (next + 1) * W));
  svg.setAttribute("height", (maxD + 1) * H + 30);
  let out = "";
  t.nodes.forEach(n => { if (n.parent >= 0) out += `<line x1="${x[n.parent]*W+20}" y1="${y[n.parent]*H+20}" x2="${x[n.id]*W+20}" y2="${y[n.id]*H+20}"/>`; });
  t.nodes.forEach(n => {
    out += `<circle data-id="${n.id}" cx="${x[n.id]*W+20}" cy="${y[n.id]*H+20}" r="11" fill="${colour(n.advantage)}"${n.is_leaf ? ' stroke-dasharray="3,2"' : ""}/>`;
    out += `<text x="${x[n.id]*W+20}" y="${y[n.id]*H+24}" text-anchor="middle">${n.id}</text>`;
  });
  svg.innerHTML = out;
  svg.querySelectorAll("circle").forEach(c => c.addEventListener("click", () => show(i, +c.dataset.id)));
  const leaves = t.nodes.filter(n => n.is_leaf).length;
  document.getElementById("summary").innerHTML = `<b>Prompt:</b> ${esc(t.prompt)}<br>${t.nodes.length} nodes, ${leaves} leaves`;
  show(i, 0);
}
function show(i, id) {
  const n = trees[i].nodes[id];
  document.querySelectorAll("svg circle").forEach(c => c.classList.toggle("selected", +c.dataset.id === id));
  document.getElementById("detail").innerHTML =
    `<p><b>node ${n.id}</b> (parent ${n.parent}, depth ${n.depth}${n.branch_of !== null ? ", branch of " + n.branch_of : ""})<br>` +
    `entropy ${fmt(n.entropy)} &middot; score ${fmt(n.score)} &middot; picked ${n.times_picked}x<br>` +
    `value ${fmt(n.value)} &middot; advantage ${fmt(n.advantage)} &middot; reward ${fmt(n.reward)}<br>` +
    `${n.is_leaf ? "leaf" : "inner"}, ended by: ${esc(n.finish || "-")}${n.query ? ", query: " + esc(n.query) : ""}</p>` +
    (n.observation ? `<h4>Observation</h4><pre class="obs">${esc(n.observation)}</pre>` : "") +
    `<h4>Turn (${n.generated_tokens} sampled tokens)</h4><pre>${esc(n.turn)}</pre>`;
}
pick.addEventListener("change", () => draw(+pick.value));
if (trees.length) draw(0);
</script></body></html>
"""
