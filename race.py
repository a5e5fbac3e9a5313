"""
The race: E2D2, BD3-LM, MDLM and AR answering the same prompts, every step of each
generation recorded with its measured wall time, replayed side by side in one web page.

    python sample.py --race=race.html --ckpt=out-compare/e2d2/ckpt.pt --ckpt=out-compare/bd3lm/ckpt.pt \\
        --ckpt=out-compare/mdlm/ckpt.pt --ckpt=out-compare/ar/ckpt.pt --num_examples=4 --threads=1
    python bench.py race --threads=1   # from nothing: trains the four models into out-compare/, then the above

The paper's claim is a speed claim: E2D2 decodes faster than BD3-LM because each denoising
step runs only the small decoder (N_dec layers) where BD3-LM runs all N. The page shows it
happening: one lane per model, the answer's blocks filling in token by token at the times
they were filled in here, the network that ran at each moment, and each lane's clock.

How a generation is recorded, without touching the sampler (e2d2.generate):
  - the model's make_runner is wrapped for the length of one generate() call, so that the
    runner generate() drives is a TimedRunner: it times the runner's constructor (E2D2 and
    BD3-LM encode the prompt there), its network call (logits: E2D2's decoder, BD3-LM's and
    MDLM's full network, AR's token step) and the call that adds a finished block to the
    context (E2D2's encoder over the block, BD3-LM's full network over it);
  - forward hooks on every transformer Layer count the layer calls each of those makes, in
    the warm-up run (hooks cost time: the timed runs go without and take the counts from it);
  - generate()'s on_step hook gives the tokens after every denoising step.
Each call is timed with time.perf_counter, after torch.cuda.synchronize() on a GPU (its work
is asynchronous). The recorder's own work (copying the tokens, the probabilities of the
revealed ones) is timed too and taken off the clock, so the page's times are the sampler's.
"""

import html
import json
import os
import platform
import statistics
import time
from typing import Optional

import torch

from e2d2 import Layer, generate, masked_log_probs
from models import code_version, is_cuda, model_spec

# The two runner calls that are timed, by their names in e2d2.Runner's interface (what
# generate() calls): the network call that gives a block's logits, and the one that makes a
# finished block clean context. The only place those names appear here.
LOGITS_CALL, FINISH_BLOCK_CALL = "logits", "finish_block"

# What each lane is, and what its three kinds of timed call run (None: that call runs no
# network for this model). {depth} is the registry's description of its layers.
LANES = {
    "e2d2": dict(name="E2D2", prompt="encoder", logits="decoder", finish="encoder",
                 about="E2D2 ({depth}): the encoder reads the prompt and each finished block once; each "
                       "denoising step runs only the small decoder on the block's tokens, against cached keys/values."),
    "bd3lm": dict(name="BD3-LM", prompt="full network", logits="full network", finish="full network",
                  about="BD3-LM ({depth}): one network; each denoising step runs all N layers on the block "
                        "(the clean blocks' keys/values cached)."),
    "mdlm": dict(name="MDLM", prompt=None, logits="full network", finish=None,
                 about="MDLM ({depth}): the whole answer is one block; each step runs all N layers over the "
                       "prompt and the whole answer (nothing can be cached)."),
    "ar": dict(name="AR", prompt=None, logits="token step", finish=None,
               about="AR ({depth}): one token per step, all N layers on the newest token against cached keys/values."),
}


class Recorder:
    """The record of one generate() call of one model: every timed call (ms since the start,
    the kind of network, the layer calls it made) and every denoising step (its time, block
    k, the rows still generating, the tokens it revealed and their probabilities)."""

    def __init__(self, model, device):
        self.model, self.device, self.lane = model, device, LANES[model.cfg.model]
        self.calls, self.steps = [], []
        self.layer_calls, self.overhead, self.t0 = 0, 0.0, None
        self.block_len, self.answer_len, self.first_block = None, None, 0  # the runner's, known once it exists
        self.last_logits, self.block, self.before = None, None, None

    def now(self) -> float:
        """ms since the start of generate(), less the recorder's own work."""
        if is_cuda(self.device):
            torch.cuda.synchronize()  # the GPU's queued work is part of the call that queued it
        return (time.perf_counter() - self.t0 - self.overhead) * 1e3

    def timed(self, kind: Optional[str], fn, *args, **kw):
        """Run fn, logging its start and end times and the Layer calls it made; kind None: a
        call that runs no network for this model (LANES), which is then not logged."""
        start, layers = self.now(), self.layer_calls
        out = fn(*args, **kw)
        end = self.now()
        if kind is not None:
            self.calls.append([round(start, 4), round(end, 4), kind, self.layer_calls - layers])
        elif self.layer_calls > layers:
            raise AssertionError(f"race.LANES[{self.model.cfg.model!r}] names no network for a call that ran "
                                 f"{self.layer_calls - layers} layer calls")
        return out

    def make_runner(self, make):
        """Wraps the model's make_runner: the runner's constructor is timed (E2D2 and BD3-LM
        encode the prompt there) and the runner comes back wrapped."""
        def wrapped(*args, **kw):
            runner = self.timed(self.lane["prompt"], make, *args, **kw)
            self.block_len, self.answer_len = runner.block_len, runner.answer_len.tolist()
            self.first_block = runner.first_block  # generate() numbers blocks over the whole sequence
            return TimedRunner(runner, self)
        return wrapped

    def on_step(self, block, step, rows, x):
        """generate()'s hook, after every denoising step: the tokens revealed in block k,
        each with p_theta(token) from the logits that revealed it (as notebook 05 colours
        them), as [row, position in the answer, token, probability]."""
        t = self.now()
        start = time.perf_counter()
        block -= self.first_block  # the page counts the answer's blocks: 0 is the first after the prompt
        if block != self.block:  # a new block starts from all [MASK]
            self.block, self.before = block, torch.full_like(x, self.model.cfg.mask_id)
        new = (self.before == self.model.cfg.mask_id) & (x != self.model.cfg.mask_id)  # (rows, B)
        p = masked_log_probs(self.last_logits.float(), self.model.cfg.mask_id).exp()  # (rows, B, V)
        p = p.gather(-1, x[..., None]).squeeze(-1)
        reveal = [[int(rows[i]), block * self.block_len + j, int(x[i, j]), round(float(p[i, j]), 3)]
                  for i, j in new.nonzero().tolist()]
        self.steps.append([round(t, 4), block, rows.tolist(), reveal])
        self.before = x.clone()
        self.overhead += time.perf_counter() - start

    def count_layer(self, module, args, out):
        self.layer_calls += 1


class TimedRunner:
    """A runner (e2d2.Runner) whose two calls LOGITS_CALL and FINISH_BLOCK_CALL are timed;
    everything else is the runner's own."""

    def __init__(self, runner, recorder: Recorder):
        self._runner, self._recorder = runner, recorder

    def __getattr__(self, name):
        attr, rec = getattr(self._runner, name), self._recorder
        if name == LOGITS_CALL:
            def logits(x_block):  # the logits are kept: on_step reads p_theta of what they revealed
                rec.last_logits = rec.timed(rec.lane["logits"], attr, x_block)
                return rec.last_logits
            return logits
        if name == FINISH_BLOCK_CALL:
            return lambda block: rec.timed(rec.lane["finish"], attr, block)
        return attr


def record(model, prompts: list, device, count_layers: bool = True, **sampling) -> tuple:
    """One generate() of `model` on `prompts` (token ids), recorded: (the Recorder, the
    SampleOutput). sampling: generate()'s keyword arguments (the generator, steps, ...).
    count_layers: count each call's Layer calls (hooks, which cost time of their own)."""
    rec = Recorder(model, device)
    hooks = [m.register_forward_hook(rec.count_layer) for m in model.modules() if isinstance(m, Layer)
             ] if count_layers else []
    model.make_runner = rec.make_runner(type(model).make_runner.__get__(model))  # this object only
    try:
        if is_cuda(device):
            torch.cuda.synchronize()
        rec.t0 = time.perf_counter()
        out = generate(model, prompts, on_step=rec.on_step, **sampling)
        rec.total_ms = rec.now()
    finally:
        del model.make_runner
        for h in hooks:
            h.remove()
    return rec, out


def plain_ms(model, prompts: list, device, **sampling) -> float:
    """The same generation without the recorder: ms."""
    if is_cuda(device):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, prompts, **sampling)
    if is_cuda(device):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def run_race(models: list, prompts: list, tok, device, repeats: int = 5, seed: int = 0, **sampling) -> dict:
    """Record every model (a list of (label, model)) answering the same prompts (token ids),
    same batch, same threads: a warm-up run each, then `repeats` rounds; in each round every
    model in turn is recorded once and timed once without the recorder. Each lane keeps its
    median recording (by total time); plain_ms is the median without the recorder. Returns
    what the page shows (write_page)."""
    def gen_kw():  # a fresh generator per run: every run of a model draws the same tokens
        return dict(sampling, generator=torch.Generator(device=device).manual_seed(seed))
    # warm-up (allocations, first-call costs; a compiled model compiles, with and without the
    # hooks), which also counts each call's layer calls
    counted = {label: record(model, prompts, device, **gen_kw())[0].calls for label, model in models}
    for _, model in models:
        plain_ms(model, prompts, device, **gen_kw())
    runs = {label: [] for label, _ in models}
    plain = {label: [] for label, _ in models}
    for _ in range(repeats):
        for label, model in models:
            rec, out = record(model, prompts, device, count_layers=False, **gen_kw())
            if [c[2] for c in rec.calls] != [c[2] for c in counted[label]]:
                raise AssertionError(f"{label}: a run made other calls than the warm-up (the same seed must repeat)")
            for call, warm in zip(rec.calls, counted[label]):
                call[3] = warm[3]
            runs[label].append((rec, out))
            plain[label].append(plain_ms(model, prompts, device, **gen_kw()))
    lanes = []
    for label, model in models:
        by_time = sorted(runs[label], key=lambda r: r[0].total_ms)
        rec, out = by_time[len(by_time) // 2]
        cfg, lane = model.cfg, LANES[model.cfg.model]
        lanes.append({
            "name": label, "model": cfg.model, "about": lane["about"].format(depth=model_spec(cfg.model).depth(cfg)),
            "block_len": rec.block_len, "answer_len": rec.answer_len, "total_ms": round(rec.total_ms, 4),
            "plain_ms": round(statistics.median(plain[label]), 4),
            "calls_ms": round(sum(c[1] - c[0] for c in rec.calls), 4),
            # every network pass (the page's counter), and those that gave logits (generate()'s NFE)
            "network_calls": len(rec.calls), "denoising_calls": out.network_calls,
            "layer_calls": sum(c[3] for c in rec.calls),
            "new_tokens": out.new_tokens, "calls": rec.calls, "steps": rec.steps,
            "final": [tok.decode(ids) for ids in out.tokens], "tokens": out.tokens})
    ids = {reveal[2] for lane in lanes for step in lane["steps"] for reveal in step[3]}  # the tokens shown
    cfg = models[0][1].cfg
    return {"prompts": [tok.decode(p) for p in prompts], "lanes": lanes, "eos_id": cfg.eos_id,
            "pieces": {str(i): tok.decode([i], mask_char="_", eos_char="$") for i in sorted(ids)},
            "repeats": repeats, "sampling": dict(sampling), **machine(device)}


def machine(device) -> dict:
    """Where the figures come from: the processor or GPU, torch's threads, torch, the commit."""
    if is_cuda(device):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    version = code_version()
    commit = (version["commit"] or "unknown")[:10] + (" (with uncommitted changes)" if version["dirty"] else "")
    return {"device": str(device), "machine": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%d")}


def write_page(race: dict, path: str, command: str = "") -> int:
    """Write the page: PAGE with the race's figures inlined as JSON. Returns its size in bytes."""
    data = json.dumps({**race, "command": command}, separators=(",", ":")).replace("</", "<\\/")  # safe in <script>
    page = PAGE.replace("@DATA@", data).replace("@TITLE@", html.escape(
        "The race: " + ", ".join(lane["name"] for lane in race["lanes"])))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return len(page.encode("utf-8"))


# ---------------------------------------------------------------------------------------
# The page: plain HTML, CSS and JavaScript, no network. The JavaScript replays each lane from
# the recorded times: at the page's clock tau (ms of recorded time), a lane shows every step
# whose time is <= tau, the block of its next step framed, the call running at tau, and its
# counters; a lane has finished once tau reaches its total time.
# ---------------------------------------------------------------------------------------

PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>@TITLE@</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
#controls { margin: .6em 0; display: flex; gap: .5em; align-items: center; flex-wrap: wrap; }
#controls button { font: inherit; padding: .2em .8em; }
#clock { font-variant-numeric: tabular-nums; margin-left: .5em; }
.lane { border: 1px solid #ccc; border-radius: 6px; padding: .5em .7em; margin: .6em 0; }
.lane.finished { border-color: #2a7; }
.head { display: flex; justify-content: space-between; align-items: baseline; gap: 1em; }
.name { font-weight: 600; font-size: 1.1em; }
.running { color: #555; font-size: .9em; }
.counters { font-variant-numeric: tabular-nums; font-size: .9em; }
.result { font-weight: 600; color: #2a7; min-height: 1.3em; }
.row { font-family: ui-monospace, monospace; margin: 2px 0; display: flex; align-items: center; white-space: pre; }
.prompt { color: #444; margin-right: .3em; }
.cell { display: inline-block; width: 1.25em; height: 1.45em; line-height: 1.45em; text-align: center; margin: 0 1px; border-radius: 2px; }
.cell.future { background: transparent; outline: 1px dotted #ccc; color: transparent; }
.cell.mask { background: #d3d3d3; color: #777; }
.cell.eos { color: #999; }
.cell.gone { display: none; }
.block { display: inline-flex; padding: 1px; border: 2px solid transparent; border-radius: 3px; }
.block.now { border-color: #1f77b4; }
.bar { position: relative; height: 10px; background: #f2f2f2; margin: .4em 0 .2em; }
.seg { position: absolute; top: 0; height: 10px; }
.cursor { position: absolute; top: -3px; width: 2px; height: 16px; background: #000; }
.k-encoder { background: #ff7f0e; } .k-decoder { background: #1f77b4; } .k-full-network { background: #d62728; }
.k-token-step { background: #9467bd; } .k-network { background: #7f7f7f; }
.legend span { display: inline-block; width: .9em; height: .9em; vertical-align: middle; margin: 0 .2em 0 .8em; }
#caption { color: #444; font-size: .9em; margin-top: 1em; }
#caption li { margin: .2em 0; }
</style></head>
<body>
<h1>@TITLE@</h1>
<div>The same prompts, the same batch, the same machine: each lane replays one real generation at the times it was measured.</div>
<div id="controls">
  <button id="play">pause</button> <button id="step">step</button> <button id="restart">restart</button>
  <label>speed <select id="speed"></select></label>
  <span id="clock"></span>
</div>
<div class="legend">networks:<span class="k-encoder"></span>encoder<span class="k-decoder"></span>decoder<span class="k-full-network"></span>full network<span class="k-token-step"></span>AR token step
&nbsp; tokens: <span style="background:#d3d3d3"></span>[MASK]<span style="background:hsl(120,60%,80%)"></span>revealed, coloured by p&theta;(token) (red low, green high)</div>
<div id="lanes"></div>
<div id="order"></div>
<div id="caption"></div>
<script type="application/json" id="race-data">@DATA@</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("race-data").textContent);
const END = Math.max(...D.lanes.map(l => l.total_ms));
const ref = D.lanes.find(l => l.model === "e2d2") || D.lanes[0];
const $ = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; };
const ms = x => x.toFixed(x < 10 ? 2 : 1) + " ms";
// the speed: how many times slower than real time; the default makes the slowest lane last about 8 s
const SPEEDS = [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000];
const hash = new URLSearchParams(location.hash.slice(1));
let slow = Number(hash.get("slow")) || SPEEDS.reduce((a, b) => Math.abs(Math.log(END * b / 8000)) < Math.abs(Math.log(END * a / 8000)) ? b : a);
let tau = 0, playing = true, lastTick = null, order = [];

// --- the lanes, built once; render() updates them -----------------------------------
const view = D.lanes.map((lane, li) => {
  const el = $("div", "lane"); el.dataset.lane = lane.name;
  const head = $("div", "head"); const name = $("span", "name", lane.name);
  const now = $("span", "running"); const counters = $("span", "counters");
  head.append(name, now, counters); el.append(head);
  const bar = $("div", "bar");
  for (const [t0, t1, kind] of lane.calls) {
    const s = $("div", "seg k-" + kind.replace(/ /g, "-")); s.title = kind + " " + ms(t1 - t0);
    s.style.left = (100 * t0 / END) + "%"; s.style.width = Math.max(100 * (t1 - t0) / END, 0.15) + "%"; bar.append(s);
  }
  const cursor = $("div", "cursor"); bar.append(cursor); el.append(bar);
  const rows = D.prompts.map((p, r) => {
    const row = $("div", "row"); row.dataset.row = r; row.append($("span", "prompt", p));
    const blocks = [], cells = [];
    const n = lane.answer_len[r], B = lane.block_len;
    for (let k = 0; k * B < n; k++) {
      const b = $("span", "block"); blocks.push(b); row.append(b);
      for (let j = k * B; j < Math.min(n, (k + 1) * B); j++) { const c = $("span", "cell future"); cells.push(c); b.append(c); }
    }
    el.append(row); return {row, blocks, cells};
  });
  const result = $("div", "result"); el.append(result);
  document.getElementById("lanes").append(el);
  return {el, now, counters, cursor, rows, result};
});

const finished = (lane, t) => t >= lane.total_ms;  // a lane has finished once the clock reaches its total time

function stateAt(lane, t) {
  // tokens revealed by every step at or before t; the next step says which block is being denoised
  const grid = D.prompts.map(() => ({}));
  let next = null;
  for (const s of lane.steps) {
    if (s[0] > t) { next = s; break; }
    for (const [r, pos, tok, p] of s[3]) grid[r][pos] = [tok, p];
  }
  let calls = 0, layers = 0, running = null;
  for (const [t0, t1, kind, n] of lane.calls) {
    if (t1 <= t) { calls += 1; layers += n; } else if (t0 <= t) running = kind;
  }
  return {grid, next, calls, layers, running, done: finished(lane, t)};
}

function render() {
  const t = Math.min(tau, END);
  D.lanes.forEach((lane, li) => {
    const v = view[li], s = stateAt(lane, t), B = lane.block_len;
    let tokens = 0;
    v.rows.forEach((rv, r) => {
      const g = s.grid[r], active = !s.done && s.next && s.next[2].includes(r) ? s.next[1] : -1;
      let eos = Infinity;  // the row's first revealed [EOS]: nothing after it counts or stays
      for (const pos in g) if (g[pos][0] === D.eos_id) eos = Math.min(eos, Number(pos));
      rv.blocks.forEach((b, k) => b.classList.toggle("now", k === active));
      rv.cells.forEach((c, pos) => {
        const k = Math.floor(pos / B);
        let cls, text = "", piece = "";
        if (g[pos]) {
          const [tok, p] = g[pos]; piece = D.pieces[tok];
          cls = tok === D.eos_id ? "eos" : "tok"; text = piece.replace(/ /g, "\u2423");
          c.style.background = tok === D.eos_id ? "#eee" : "hsl(" + Math.round(120 * p) + ",60%,80%)";
          if (pos <= eos) tokens += 1;
        } else {
          c.style.background = ""; cls = k === active ? "mask" : "future"; text = k === active ? "_" : "";
        }
        if (pos > eos && Math.floor(eos / B) !== active) cls += " gone";  // the row stopped at its [EOS]
        c.className = "cell " + cls; c.textContent = text; c.dataset.piece = piece; c.dataset.tok = g[pos] ? g[pos][0] : "";
      });
    });
    const elapsed = Math.min(t, lane.total_ms);
    v.now.textContent = s.done ? "" : s.running ? "running: " + s.running : "sampler: choosing tokens";
    v.counters.textContent = ms(elapsed) + " · network calls " + s.calls + " · layer calls " + s.layers +
      " · " + (elapsed > 0 ? Math.round(1000 * tokens / elapsed) : 0) + " tokens/s";
    v.cursor.style.left = (100 * elapsed / END) + "%";
    v.el.classList.toggle("finished", s.done);
    if (s.done && !order.includes(li)) order.push(li);  // lanes finishing in the same tick: see tick()
    const rank = order.indexOf(li);
    v.el.dataset.rank = rank < 0 ? "" : rank + 1;
    v.result.textContent = s.done ? "#" + (rank + 1) + " finished in " + ms(lane.total_ms) + ", " +
      (lane === ref ? "the reference" : (lane.total_ms / ref.total_ms).toFixed(2) + "x " + ref.name + "'s time") +
      " · " + Math.round(1000 * lane.new_tokens / lane.total_ms) + " tokens/s" : "";
  });
  document.getElementById("clock").textContent = "recorded time " + ms(t) + " of " + ms(END) +
    (slow === 1 ? ", real time" : ", played " + slow + "x slower");
  document.getElementById("order").textContent = order.length ? "finished: " + order.map(i => D.lanes[i].name).join(", ") : "";
  document.body.dataset.done = order.length === D.lanes.length ? "1" : "";
  document.getElementById("play").textContent = playing ? "pause" : "play";
}

function advance(t) {
  // lanes that finish within one move of the clock are ranked by their recorded times
  const before = D.lanes.map(l => finished(l, tau));
  tau = t;
  D.lanes.map((l, i) => [l, i]).filter(([l, i]) => !before[i] && finished(l, tau))
    .sort((a, b) => a[0].total_ms - b[0].total_ms).forEach(([l, i]) => order.includes(i) || order.push(i));
  render();
}

function tick(now) {
  if (playing && lastTick !== null) advance(Math.min(END, tau + (now - lastTick) / slow));
  if (tau >= END) playing = false;
  lastTick = now;
}
setInterval(() => tick(performance.now()), 16);

const events = [...new Set(D.lanes.flatMap(l => [...l.steps.map(s => s[0]), ...l.calls.map(c => c[1]), l.total_ms]))].sort((a, b) => a - b);
document.getElementById("play").onclick = () => { if (tau >= END) { tau = 0; order = []; } playing = !playing; lastTick = null; render(); };
document.getElementById("step").onclick = () => { playing = false; const e = events.find(x => x > tau); if (e !== undefined) advance(e); };
document.getElementById("restart").onclick = () => { tau = 0; order = []; playing = true; lastTick = null; render(); };
const sel = document.getElementById("speed");
for (const s of SPEEDS.includes(slow) ? SPEEDS : [...SPEEDS, slow].sort((a, b) => a - b)) {
  const o = $("option", "", s === 1 ? "real time" : s + "x slower"); o.value = s; o.selected = s === slow; sel.append(o);
}
sel.onchange = () => { slow = Number(sel.value); render(); };

// --- the caption: what each lane is and where the figures come from -----------------
const cap = document.getElementById("caption");
const ul = $("ul");
for (const lane of D.lanes) ul.append($("li", "", lane.about + " Here: " + lane.network_calls + " network calls (" + lane.denoising_calls +
  " denoising steps" + (lane.network_calls > lane.denoising_calls ? ", the rest encoding clean tokens" : "") + "), " +
  lane.layer_calls + " layer calls, " + lane.new_tokens + " tokens in " + ms(lane.total_ms) +
  " (the same generation without the recorder: " + ms(lane.plain_ms) + "; its network calls: " +
  Math.round(100 * lane.calls_ms / lane.total_ms) + "% of the time, the rest is the sampler choosing tokens)." + (lane.trained ? " " + lane.trained : "")));
cap.append(ul);
cap.append($("p", "", "Measured on " + D.machine + " (" + D.device + ", " + D.threads + " thread" + (D.threads > 1 ? "s" : "") +
  ", torch " + D.torch + "), code at commit " + D.commit + ", " + D.date + ": batch of " + D.prompts.length +
  " prompts; each lane is the median of " + D.repeats + " recorded generations. Every network call was timed (after " +
  "torch.cuda.synchronize() on a GPU); between calls the sampler picks the tokens to reveal. " +
  "Made by: " + (D.command || "sample.py --race")));
render();
</script>
</body></html>
"""
