"""
Benchmarks: E2D2 against its baselines, side by side, with the analytic costs beside the
measured figures.

    python bench.py train     # training step speed and activation memory of every model
    python bench.py sample    # sampling tokens/s: E2D2 cached and uncached, BD3-LM, MDLM, AR
    python bench.py compare   # train every model with train.py's settings, held-out results
    python bench.py speedup --against=COMMIT  # cached samplers of a git commit vs this code
    python bench.py race --out=docs/race.html  # the four models (trained unless out-compare holds them) race in a page
    python bench.py train --out=bench/training_cpu.json     # also write the figures as JSON
    python bench.py compare --max_steps=500                 # other flags go to train.py

The models have random weights in `train` and `sample` (speed does not depend on what a
model has learned). Every timing is a median after warm-up runs; GPU work is waited for
before the clock is read. The analytic costs count what each model runs (layer calls and
layer-token passes); tests check those counts against hooks on the real layers.
"""

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields
from typing import Optional

import torch
from tqdm import tqdm

import data
from e2d2 import Layer, ModelConfig, apply_rope, generate, q_sample, sample_t, subs_log_probs
from models import (DTYPES, MODEL_TYPES, MODELS, answer_pairs, autocast_for, build_model, code_version,
                    compile_for_sampling, config_from_dict, init_from_checkpoint, is_cuda, load_checkpoint,
                    model_from_checkpoint, model_spec, peak_bf16_tflops, pick_device, train_flops_per_token,
                    upgrade_state_dict)

ROOT = os.path.dirname(os.path.abspath(__file__))  # where the scripts are (compare and race run them)


def timed(fn, device: str):
    """Run fn() and return (its result, wall seconds), waiting for the GPU if there is one:
    GPU work is asynchronous, so the clock is read only once it has finished."""
    if is_cuda(device):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if is_cuda(device):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def write_json(path: str, obj) -> None:
    """Write the figures, with the commit they were measured at (code_version)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**code_version(path), **obj}, f, indent=2)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------
# Training speed: forward + backward + AdamW steps on random tokens at matched sizes.
# ---------------------------------------------------------------------------------------

# prompt 16 + answer 128 tokens, width 256, N_enc=12 (baselines: N=12), N_dec=2, B=8
BENCH_MODEL = dict(d_model=256, n_heads=4, n_enc=12, n_dec=2, block_len=8, seq_len=16 + 128)
BENCH_PROMPT = 16


def training_cost(cfg: ModelConfig) -> int:
    """Analytic cost of one training forward, in layer passes per data token, as the model's
    registry entry counts it (models.MODELS): E2D2 runs N_enc layers over x_0 and N_dec over
    x_t; BD3-LM its N layers over [x_0 ; x_t] (2L tokens); MDLM and AR N layers over L.
    (Attention and the backward pass are left out.)"""
    return model_spec(cfg.model).training_cost(cfg)


def saved_activation_bytes(model, x0, prompt_mask, autocast) -> int:
    """Bytes of the tensors autograd keeps for the backward pass during one forward: the
    activation memory of a training step, measured the same way on CPU and GPU."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)  # a storage saved twice counts once
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x0, prompt_mask, generator=torch.Generator(device=x0.device).manual_seed(0)).loss
    return total


def bench_training(batch: int, repeats: int, device: str, model_over: dict = None, out: str = "",
                   dtype: str = "auto"):
    """Time forward + backward + optimizer steps of every model type on random tokens at
    matched sizes (E2D2: N_enc + N_dec layers; the baselines: N = N_enc), in the precision
    `dtype` (models.autocast_for). After 2 warm-up steps, the median of `repeats` steps.
    Prints tokens/s, the model's TFLOP/s (models.train_flops_per_token; MFU on a GPU whose
    bf16 peak is known), memory and the speed ratio to E2D2 beside the analytic one."""
    model_over = model_over or {}
    autocast = autocast_for(device, dtype)
    peak = peak_bf16_tflops(device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in MODEL_TYPES:
        cfg = ModelConfig(**{**BENCH_MODEL, **model_over, "model": name})
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        L = cfg.seq_len
        x0 = torch.randint(0, 256, (batch, L), generator=g).to(device)  # random bytes
        prompt_mask = torch.zeros_like(x0, dtype=torch.bool)
        prompt_mask[:, :BENCH_PROMPT] = True
        noise = torch.Generator(device=device).manual_seed(0)

        def step():
            with autocast:
                loss = model(x0, prompt_mask, generator=noise).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):  # warm-up
            step()
        if is_cuda(device):
            torch.cuda.reset_peak_memory_stats()
        times = [timed(step, device)[1] for _ in tqdm(range(repeats), desc=f"bench {name}", leave=False)]
        step_s = statistics.median(times)
        row = {"model": name, "layers": model_spec(name).depth(cfg),
               "params": model.num_params(), "step_s": step_s,
               "tokens_per_s": batch * L / step_s,
               "tflops_per_s": batch * L * train_flops_per_token(model, L) / step_s / 1e12,
               "activation_mib": saved_activation_bytes(model, x0, prompt_mask, autocast) / 2**20,
               "cost": training_cost(cfg)}
        if is_cuda(device):
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if peak:
            row["mfu"] = row["tflops_per_s"] / peak
        rows.append(row)
    e2d2_row = rows[0]
    for r in rows:  # how many times faster E2D2 trains than this model, measured and analytic
        r["ratio_e2d2_over_model"] = e2d2_row["tokens_per_s"] / r["tokens_per_s"]
        r["analytic_ratio"] = r["cost"] / e2d2_row["cost"]
    cfg0 = ModelConfig(**{**BENCH_MODEL, **model_over})
    print(f"training step, batch {batch} x {cfg0.seq_len} tokens (prompt {BENCH_PROMPT}), "
          f"width {cfg0.d_model}, N_enc={cfg0.n_enc}, N_dec={cfg0.n_dec}, B={cfg0.block_len}, "
          f"device={device}, dtype={dtype}, median of {repeats}")
    mem = "peak MiB" if is_cuda(device) else "activations MiB"
    print(f"{'model':8} {'layers':>17} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'step ms':>9} {mem:>16} "
          f"{'E2D2 speed-up':>14} {'analytic':>9}")
    for r in rows:
        m = r.get("peak_mib", r["activation_mib"])
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['model']:8} {r['layers']:>17} {r['tokens_per_s']:>10.0f} {r['tflops_per_s']:>8.3g} {mfu:>6} "
              f"{r['step_s'] * 1e3:>9.1f} {m:>16.1f} {r['ratio_e2d2_over_model']:>13.2f}x {r['analytic_ratio']:>8.2f}x")
    print("E2D2 speed-up = E2D2 tokens/s / model tokens/s; analytic = layer passes per token of the "
          "model / of E2D2 (linear layers only). TFLOP/s: the model's FLOPs (models.train_flops_per_token); "
          + (f"MFU: of the device's dense bf16 peak, {peak:g} TFLOP/s" if peak else "MFU: a GPU of known peak only"))
    if out:
        write_json(out, {"device": device, "dtype": dtype, "threads": torch.get_num_threads(), "batch": batch,
                         "config": asdict(cfg0), "rows": rows})
    return rows


# ---------------------------------------------------------------------------------------
# Sampling speed: tokens/s and network calls, E2D2 against the baselines.
# ---------------------------------------------------------------------------------------

# prompt 16, answer 128, width 256, N_enc=12, N_dec=2, B=8, T=8
BENCH = dict(prompt=16, answer=128, d_model=256, n_heads=4, n_enc=12, n_dec=2, block_len=8, steps=8)
# (label, model type, use_cache): every model in the registry, with its cache where it has one,
# and E2D2 without (the reference every cached sampler must match, to show what the cache saves)
BENCH_VARIANTS = [(f"{name} cached" if spec.has_cache else name, name, spec.has_cache) for name, spec in MODELS.items()]
BENCH_VARIANTS.insert(1, ("e2d2 no cache", "e2d2", False))


def sampling_cost(model: str, use_cache: bool, P: int, A: int, B: int, T: int, n_enc: int, n_dec: int):
    """Analytic cost per generated token of sampling A tokens after a P-token prompt, with
    T steps per block of B (no early stop), as the model's registry entry counts it
    (models.MODELS[model].sampling_cost). Returns (layer-token passes, layer calls): the
    first is what compute-bound hardware pays (linear layers; attention left out), the
    second what a latency-bound one pays (one call per layer, whatever its width).
      E2D2 cached:   prompt through the encoder; per block T decoder calls on B tokens, then
                     the encoder on the finished block (not after the last one).
      E2D2 no cache: every step re-runs encoder + decoder over prompt + blocks so far.
      BD3-LM cached: as E2D2 cached, but all N layers at every step.
      MDLM:          K * T steps (as many as the block models take), all N layers over P + A.
      AR cached:     the prompt, then one token per call."""
    cfg = ModelConfig(model=model, n_enc=n_enc, n_dec=n_dec, block_len=B, seq_len=B * math.ceil((P + A) / B))
    tokens, calls = model_spec(model).sampling_cost(cfg, use_cache, P, A, B, T)
    return tokens / A, calls / A


def block_steps(model) -> list:
    """The steps per block a quality table shows: T = B and B/2 for a model that samples in
    blocks of its block_len (E2D2, BD3-LM), its default alone otherwise (AR: one token per
    step, MDLM: one block of the whole answer)."""
    B = model.cfg.block_len  # asked of its runner, for an answer of two blocks: its own block length
    own = model.make_runner(torch.zeros(1, B, dtype=torch.long, device=model.embed.weight.device), False, 2 * B)
    return [B, B // 2] if own.block_len == B > 1 else [None]


def steps_per_own_block(model, P: int, A: int, B: int, T: int) -> int:
    """The steps per block that give `model`'s own sampler as many denoising steps in all as
    T per block of B: T for the block models, A / B * T for MDLM (one block of A tokens),
    1 for AR (its runner takes one step per token whatever it is given)."""
    own_block = model.make_runner(torch.zeros(1, P, dtype=torch.long, device=model.embed.weight.device),
                                  False, A).block_len
    return max(1, T * own_block // B)


def layer_time_model(model, batch: int, n_tokens: int, device: str) -> dict:
    """Time one call of the full (bidirectional) network on `batch` x 1 and `batch` x
    n_tokens tokens and split a layer call's time into a fixed part and a per-token part:
    time(one layer, n tokens) ~ call_s + token_s * n. Small calls are latency-bound (the
    fixed part dominates); large ones compute-bound."""

    def per_layer(n):
        x = torch.randint(0, 256, (batch, n), device=device)
        no_prompt = torch.zeros_like(x, dtype=torch.bool)
        with torch.no_grad():
            model.logits(x, x, no_prompt)  # warm-up
            times = [timed(lambda: model.logits(x, x, no_prompt), device)[1] for _ in range(5)]
        return statistics.median(times) / model.cfg.n_enc

    t1, tn = per_layer(1), per_layer(n_tokens)
    token_s = max(tn - t1, 0.0) / (n_tokens - 1)
    return {"call_s": max(t1 - token_s, 0.0), "token_s": token_s}


def bench_sampling(batches: list, repeats: int, device: str, out: str = "", dtype: str = "auto"):
    """Generated tokens/s and network calls of E2D2 (with and without cache), BD3-LM, MDLM
    and AR at the same sizes, on random weights (speed does not depend on training), with
    the [EOS] stop off so that every run generates exactly `answer` tokens, in the precision
    `dtype` (models.autocast_for). Each timing is the median of `repeats` runs after a
    warm-up run."""
    P, A, B, T = BENCH["prompt"], BENCH["answer"], BENCH["block_len"], BENCH["steps"]
    models = {}
    for name in MODELS:
        torch.manual_seed(0)
        cfg = ModelConfig(model=name, seq_len=P + A, d_model=BENCH["d_model"], n_heads=BENCH["n_heads"],
                          n_enc=BENCH["n_enc"], n_dec=BENCH["n_dec"], block_len=B)
        models[name] = build_model(cfg).to(device).eval()
    autocast = autocast_for(device, dtype)
    g = torch.Generator().manual_seed(0)
    rows, fits = [], {}
    for batch in batches:
        prompts = torch.randint(0, 256, (batch, P), generator=g).tolist()
        with autocast:
            fits[batch] = layer_time_model(models["mdlm"], batch, P + A, device)
        for label, name, use_cache in BENCH_VARIANTS:
            steps = steps_per_own_block(models[name], P, A, B, T)
            kw = dict(max_new_tokens=A, steps=steps, use_cache=use_cache, stop_at_eos=False)
            with autocast:
                generate(models[name], prompts, **kw)  # warm-up
                runs = [timed(lambda: generate(models[name], prompts, **kw), device)
                        for _ in tqdm(range(repeats), desc=f"bench {label} b={batch}", leave=False)]
            seconds = statistics.median(s for _, s in runs)
            first = runs[0][0]
            ops, calls = sampling_cost(name, use_cache, P, A, B, T, BENCH["n_enc"], BENCH["n_dec"])
            rows.append({"batch": batch, "variant": label, "tokens_per_s": batch * A / seconds,
                         "seconds": seconds, "network_calls": first.network_calls,
                         "encoder_calls": first.encoder_calls, "layer_tokens_per_token": ops,
                         "layer_calls_per_token": calls,
                         "predicted_s_per_token": fits[batch]["call_s"] * calls + fits[batch]["token_s"] * ops})
    print(f"sampling {A} tokens after a {P}-token prompt; width {BENCH['d_model']}, N_enc={BENCH['n_enc']}, "
          f"N_dec={BENCH['n_dec']} (baselines N={BENCH['n_enc']}), block {B}, {T} steps per block; "
          f"device={device}, dtype={dtype}; median of {repeats}")
    for batch in batches:
        f = fits[batch]
        print(f"batch {batch}: one layer call costs {f['call_s'] * 1e3:.3f} ms + {f['token_s'] * 1e6:.1f} us "
              f"per token (measured on 1 and {P + A} tokens)")
    print(f"{'batch':>5} {'variant':14} {'tokens/s':>9} {'calls':>6} {'E2D2 speed-up':>13} "
          f"{'analytic: layer-tokens':>22} {'layer calls':>11} {'both, timed':>11}")
    for batch in batches:
        ref = next(r for r in rows if r["batch"] == batch and r["variant"] == "e2d2 cached")
        for r in (r for r in rows if r["batch"] == batch):  # every ratio is relative to E2D2 cached
            r["speedup_measured"] = ref["tokens_per_s"] / r["tokens_per_s"]
            r["speedup_analytic_tokens"] = r["layer_tokens_per_token"] / ref["layer_tokens_per_token"]
            r["speedup_analytic_calls"] = r["layer_calls_per_token"] / ref["layer_calls_per_token"]
            r["speedup_predicted"] = r["predicted_s_per_token"] / ref["predicted_s_per_token"]
            print(f"{batch:>5} {r['variant']:14} {r['tokens_per_s']:>9.1f} {r['network_calls']:>6} "
                  f"{r['speedup_measured']:>12.2f}x {r['speedup_analytic_tokens']:>21.2f}x "
                  f"{r['speedup_analytic_calls']:>10.2f}x {r['speedup_predicted']:>10.2f}x")
    print("E2D2 speed-up = tokens/s of E2D2 cached / of the variant. Analytic = the variant's cost per "
          "token / E2D2 cached's, counted in layer-token passes (what compute-bound hardware pays), in "
          "layer calls (what a latency-bound one pays), and both weighted by the timed cost of one "
          "layer call and of one token")
    if out:
        write_json(out, {"device": device, "dtype": dtype, "threads": torch.get_num_threads(), "sizes": BENCH,
                         "layer_time": fits, "rows": rows})
    return rows


# ---------------------------------------------------------------------------------------
# Sampler speed-up against an earlier commit, and the distance to the machine's limit.
# ---------------------------------------------------------------------------------------

CODE_FILES = ("e2d2.py", "baselines.py", "models.py", "data.py")  # what a model and its sampler need
CACHED = [(name, name) for name, spec in MODELS.items() if spec.has_cache]  # (label, model type): the cached samplers


def load_code_at(commit: str):
    """The models and e2d2 modules of `commit` (with its own baselines and data), imported from
    `git show COMMIT:file` copies in a temporary directory, next to this code's modules in
    the same process. The module names are the same, so this code's entries in sys.modules
    are put aside while the old ones import each other, then put back."""
    root = os.path.dirname(os.path.abspath(__file__))
    tmp = tempfile.mkdtemp(prefix="bench-old-")
    for name in CODE_FILES:
        r = subprocess.run(["git", "-C", root, "show", f"{commit}:{name}"], capture_output=True, text=True)
        if r.returncode != 0:
            raise ValueError(f"--against={commit}: cannot read {name} at that commit ({r.stderr.strip()})")
        with open(os.path.join(tmp, name), "w") as f:
            f.write(r.stdout)
    names = [n[:-3] for n in CODE_FILES]
    mine = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, tmp)
    try:
        old = importlib.import_module("models"), sys.modules["e2d2"]
    finally:
        sys.path.remove(tmp)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(mine)
    return old


def machine_rates(threads: int) -> dict:
    """What the limit is made of, measured here with `threads` threads: the float32
    matrix-multiply rate (FLOP/s, a large square matmul) and the memory bandwidth (bytes/s
    read, a sum over a 256 MiB tensor, far larger than any cache)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    big = torch.ones(64 * 2**20)  # 256 MiB of float32
    a @ b, big.sum()  # warm-up
    mm_s = statistics.median(timed(lambda: a @ b, "cpu")[1] for _ in range(10))
    read_s = statistics.median(timed(lambda: big.sum(), "cpu")[1] for _ in range(5))
    return {"flops_per_s": 2 * 1024**3 / mm_s, "bytes_per_s": big.numel() * 4 / read_s}


def layer_limits(cfg, name: str, batch: int, rates: dict) -> dict:
    """What one layer call of a cached sampler needs at the limit, on average over its
    calls (sampling_cost's counts; the head and attention's keys * d left out): the
    arithmetic of its linear layers (2 FLOPs per weight per token) at the measured matmul
    rate, and reading the layer's weights once (float32) at the measured bandwidth."""
    P, A, B, T = BENCH["prompt"], BENCH["answer"], BENCH["block_len"], BENCH["steps"]
    tokens, calls = sampling_cost(name, True, P, A, B, T, cfg.n_enc, cfg.n_dec)  # per token of one row
    weights = sum(p.numel() for p in Layer(cfg).parameters())  # every layer of these models has this size
    tokens_per_call = batch * tokens / calls  # rows the average layer call multiplies
    return {"layer_calls": calls * A, "tokens_per_call": tokens_per_call,
            "compute_s": 2 * weights * tokens_per_call / rates["flops_per_s"],
            "weights_s": 4 * weights / rates["bytes_per_s"]}


def bench_speedup(against: str, batches: list, repeats: int, out: str = "", compile_e2d2: bool = False):
    """Cached sampling tokens/s of E2D2, BD3-LM and AR: the code of commit `against` and
    this code, side by side in one process, on the same weights and prompts, at 1 thread
    and at the default number of threads. Rounds alternate (old, new, new, old, ...) so
    that a slow spell of the machine hits both; each figure is the median of `repeats`.
    Both must generate the same tokens. Prints the speed-ups and, per sampler, the time of
    one layer call next to what its arithmetic and its weight reads need at this machine's
    measured rates (the limit). compile_e2d2: also time E2D2 after compile_for_sampling, the
    old code's and this code's (two more sides in the same alternating rounds; compiled once
    per thread count, the compile time reported apart)."""
    old_models, old_e2d2 = load_code_at(against)
    P, A, B, T = BENCH["prompt"], BENCH["answer"], BENCH["block_len"], BENCH["steps"]
    default_threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    pairs = {}
    for label, name in CACHED:
        kw = dict(model=name, seq_len=P + A, d_model=BENCH["d_model"], n_heads=BENCH["n_heads"],
                  n_enc=BENCH["n_enc"], n_dec=BENCH["n_dec"], block_len=B)
        torch.manual_seed(0)
        old = old_models.build_model(old_models.ModelConfig(**kw)).eval()
        new = build_model(ModelConfig(**kw)).eval()
        new.load_state_dict(upgrade_state_dict(old.state_dict()))  # the same weights
        pairs[label] = (ModelConfig(**kw), old, new)
    rows = []
    for threads in sorted({1, default_threads}):
        rates = machine_rates(threads)
        print(f"{threads} thread(s): matmul {rates['flops_per_s'] / 1e9:.1f} GFLOP/s, "
              f"memory read {rates['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
        compiled = {}  # compiled anew at each thread count: inductor may build its kernels for it
        if compile_e2d2:
            cfg, old, new = pairs["e2d2"]
            compiled["old_compiled"] = old_models.build_model(old.cfg).eval()  # the old code's own config
            compiled["old_compiled"].load_state_dict(old.state_dict())
            old_models.compile_for_sampling(compiled["old_compiled"])
            compiled["compiled"] = build_model(cfg).eval()
            compiled["compiled"].load_state_dict(new.state_dict())
            compile_for_sampling(compiled["compiled"])
        for batch in batches:
            prompts = torch.randint(0, 256, (batch, P), generator=g).tolist()
            kw = dict(max_new_tokens=A, steps=T, use_cache=True, stop_at_eos=False)
            for label, (cfg, old, new) in pairs.items():
                runs = {"old": lambda: old_e2d2.generate(old, prompts, **kw), "new": lambda: generate(new, prompts, **kw)}
                new_tokens = runs["new"]().tokens  # also the warm-up
                same = runs["old"]().tokens == new_tokens
                extra = {}
                if compiled and label == "e2d2":
                    runs["old_compiled"] = lambda: old_e2d2.generate(compiled["old_compiled"], prompts, **kw)
                    runs["compiled"] = lambda: generate(compiled["compiled"], prompts, **kw)
                    for side in ("old_compiled", "compiled"):
                        start = time.perf_counter()
                        extra[f"{side}_same_tokens"] = runs[side]().tokens == new_tokens  # compiles
                        extra[f"{side}_compile_s"] = time.perf_counter() - start
                times = {side: [] for side in runs}
                sides = list(runs)
                for r in tqdm(range(repeats), desc=f"{label} b={batch} {threads}t", leave=False):
                    for side in (sides if r % 2 == 0 else sides[::-1]):  # old, new(, compiled ...), then back
                        times[side].append(timed(runs[side], "cpu")[1])
                lim = layer_limits(cfg, label, batch, rates)
                row = {"threads": threads, "batch": batch, "sampler": label, "same_tokens": same, **lim, **extra}
                for side in runs:
                    s = statistics.median(times[side])
                    row[f"{side}_tokens_per_s"] = batch * A / s
                    row[f"{side}_layer_call_s"] = s / lim["layer_calls"]
                row["speedup"] = row["new_tokens_per_s"] / row["old_tokens_per_s"]
                if "compiled" in runs:  # compiled against the old code, eager and compiled
                    row["compiled_speedup"] = row["compiled_tokens_per_s"] / row["old_tokens_per_s"]
                    row["compiled_speedup_vs_old_compiled"] = row["compiled_tokens_per_s"] / row["old_compiled_tokens_per_s"]
                rows.append(row)
    print(f"\ncached sampling, {A} tokens after a {P}-token prompt, width {BENCH['d_model']}, N_enc={BENCH['n_enc']}, "
          f"N_dec={BENCH['n_dec']} (baselines N={BENCH['n_enc']}), block {B}, {T} steps; float32 CPU; "
          f"old = {against}, new = this code; median of {repeats} alternating rounds")
    print(f"{'threads':>7} {'batch':>5} {'sampler':8} {'old tok/s':>10} {'new tok/s':>10} {'speed-up':>8} "
          f"{'same tokens':>11}")
    for r in rows:
        print(f"{r['threads']:>7} {r['batch']:>5} {r['sampler']:8} {r['old_tokens_per_s']:>10.1f} "
              f"{r['new_tokens_per_s']:>10.1f} {r['speedup']:>7.2f}x {str(r['same_tokens']):>11}")
    for r in rows:
        if "compiled_speedup" in r:
            print(f"{r['threads']:>7} {r['batch']:>5} e2d2 --compile: old {r['old_compiled_tokens_per_s']:.1f} tok/s, "
                  f"new {r['compiled_tokens_per_s']:.1f} tok/s, {r['compiled_speedup_vs_old_compiled']:.2f}x old "
                  f"compiled, {r['compiled_speedup']:.2f}x old eager; same tokens as new eager: old "
                  f"{r['old_compiled_same_tokens']}, new {r['compiled_same_tokens']}; compile + first run "
                  f"old {r['old_compiled_compile_s']:.1f} s, new {r['compiled_compile_s']:.1f} s")
    print("\ndistance to the limit: one layer call (generation time / layer calls), old and new, "
          "next to what it needs at the measured rates")
    print(f"{'threads':>7} {'batch':>5} {'sampler':8} {'tokens/call':>11} {'old ms':>8} {'new ms':>8} "
          f"{'arithmetic ms':>13} {'weight read ms':>14} {'new / limit':>11}")
    for r in rows:
        limit = max(r["compute_s"], r["weights_s"])
        r["new_over_limit"] = r["new_layer_call_s"] / limit
        r["old_over_limit"] = r["old_layer_call_s"] / limit
        print(f"{r['threads']:>7} {r['batch']:>5} {r['sampler']:8} {r['tokens_per_call']:>11.1f} "
              f"{r['old_layer_call_s'] * 1e3:>8.3f} {r['new_layer_call_s'] * 1e3:>8.3f} "
              f"{r['compute_s'] * 1e3:>13.3f} {r['weights_s'] * 1e3:>14.3f} {r['new_over_limit']:>10.1f}x")
        if "compiled_layer_call_s" in r:
            r["compiled_over_limit"] = r["compiled_layer_call_s"] / limit
            print(f"{'':>7} {'':>5} {'compiled':8} {'':>11} {'':>8} {r['compiled_layer_call_s'] * 1e3:>8.3f} "
                  f"{'':>13} {'':>14} {r['compiled_over_limit']:>10.1f}x")
    print("tokens/call: rows the average layer call multiplies (batch x tokens). arithmetic: 2 FLOPs per "
          "weight per row at the measured matmul rate; weight read: the layer's float32 weights once at the "
          "measured memory bandwidth (the head and attention scores left out). new / limit: how many times "
          "the larger of the two one layer call takes")
    torch.set_num_threads(default_threads)
    if out:
        write_json(out, {"device": "cpu", "against": against, "sizes": BENCH,
                         "repeats": repeats, "rows": rows})
    return rows


# ---------------------------------------------------------------------------------------
# Looking inside: the attention weights a layer computes (the notebooks draw them).
# ---------------------------------------------------------------------------------------


def attention_weights(layer: Layer, x, cos, sin, mask, past_kv=None, write_kv=None) -> torch.Tensor:
    """The attention weights of `layer` on its input x (b, n, d): softmax(q k^T / sqrt(hd)) over
    [earlier keys ; x's keys], (b, H, n, n_past + n), recomputed from the layer's own norm,
    projections and RoPE (F.scaled_dot_product_attention, which the model calls, returns
    none). Takes what the layer was called with (Layer.forward's arguments; write_kv, a
    sampler's cache writer, writes x's keys again where the call wrote them)."""
    qkv = layer.attn.qkv(layer.norm1(x)).unflatten(-1, (3, layer.attn.n_heads, -1))  # (b, n, 3, H, hd)
    q, k, v = (apply_rope(qkv[:, :, i], cos, sin) if i < 2 else qkv[:, :, i] for i in range(3))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, H, n, hd) each
    if past_kv is not None:
        k = torch.cat([past_kv[0], k], dim=2)  # (b, H, n_past + n, hd)
    elif write_kv is not None:
        k, _ = write_kv(k, v)  # the cached keys, then x's
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, H, n, n_past + n)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], -math.inf)
    return scores.softmax(-1)


# ---------------------------------------------------------------------------------------
# Quality with the same budget: train.py once per model, the same flags.
# ---------------------------------------------------------------------------------------


def train_one(name: str, run_dir: str, train_flags: list) -> None:
    """train.py --model=name into run_dir, with the given flags."""
    print(f"\n=== {name} ===", flush=True)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--model={name}", f"--out_dir={run_dir}",
                        *train_flags])
    if r.returncode != 0:
        raise ValueError(f"train.py --model={name} failed (exit code {r.returncode})")


def compare(train_flags: list, out_dir: str, out: str = ""):
    """Train E2D2 and the three baselines by running train.py with the same flags
    (baselines: N = n_enc layers), each into out_dir/<model>, then print a markdown table
    of what their checkpoints hold: held-out results, sampling and training speed."""
    if any(f.startswith("--model") for f in train_flags):
        raise ValueError("compare trains every model type; drop --model")
    rows = []
    for name in MODEL_TYPES:
        run_dir = os.path.join(out_dir, name)
        train_one(name, run_dir, train_flags)
        ckpt = load_checkpoint(os.path.join(run_dir, "ckpt.pt"), "cpu")
        model = model_from_checkpoint(ckpt, "cpu")
        cfg, m = model.cfg, ckpt["metrics"]
        rows.append({"model": name, "layers": model_spec(name).depth(cfg),
                     "params": model.num_params(), **m})
    tc = ckpt["train_config"]
    print(f"\n{tc['data'] or tc['task']}, {tc['max_steps']} steps of batch {tc['batch_size']}")
    print("| model | layers | params | exact match | val NELBO ± SE, nats/token (AR: NLL) | sampling tokens/s "
          "| training tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.2f}M | {r['exact_match']:.3f} | "
              f"{r['val_nelbo']:.4f} ± {r['val_nelbo_se']:.4f} | {r.get('sample_tokens_per_s', float('nan')):.0f} | "
              f"{r['train_tokens_per_s']:.0f} |")
    if out:
        write_json(out, {"train_flags": train_flags, "train_config": tc, "rows": rows})
    return rows


# ---------------------------------------------------------------------------------------
# The race (race.py): compare's four models answer the same held-out prompts, every step
# timed, and a web page replays them side by side. One command from nothing to the page.
# ---------------------------------------------------------------------------------------

RACE_PROMPTS = 4  # held-out prompts: one batch, a row each in every lane
# the budget of the models race trains (on train.py's default task; flags given after them
# win): 400 steps of batch 128. Held-out exact match there: E2D2 0.996, BD3-LM 0.867, AR
# 0.012, MDLM 0.000 (a busy 2-core CPU took about 50 minutes for the four, one thread)
RACE_TRAIN = ["--max_steps=400", "--eval_every=400"]


def race(given: list, train_flags: list, out_dir: str, page: str, repeats: int, threads: int, device: str) -> None:
    """Train the models compare trains, each into out_dir/<model> with the same flags
    (RACE_TRAIN, then train_flags; train.py's defaults are the default task), unless out_dir
    already holds its checkpoint (then it is reused, and the user gave no training flags:
    `given`), then `sample.py --race` records them all answering the same prompts and
    writes the page."""
    lanes = ["e2d2", "bd3lm"] + [name for name in MODEL_TYPES if name not in ("e2d2", "bd3lm")]  # E2D2 beside what it splits
    ckpts = {name: os.path.join(out_dir, name, "ckpt.pt") for name in lanes}
    have = [name for name, path in ckpts.items() if os.path.exists(path)]
    if have and given:
        raise ValueError(f"{out_dir} already holds the runs of {', '.join(have)}: the training flags "
                         f"{' '.join(given)} would not apply to them (another --out_dir trains anew)")
    for name in MODEL_TYPES:
        if name not in have:
            train_one(name, os.path.join(out_dir, name), RACE_TRAIN + train_flags)
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), f"--race={page}", *(f"--ckpt={p}" for p in ckpts.values()),
           f"--num_examples={RACE_PROMPTS}", f"--repeats={repeats}", f"--device={device}"]
    if threads:
        cmd.append(f"--threads={threads}")
    print("\n" + " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise ValueError(f"sample.py --race failed (exit code {r.returncode})")


# ---------------------------------------------------------------------------------------
# Fine-tuning from a pretrained AR model, on a conditional task (docs/finetuning.md):
# restore the vowels of a phrase of the Python documentation (data.write_pydoc_task). An AR
# model is pretrained on the documentation's text, then every model is fine-tuned from it
# with the same budget, each at the learning rate of a small sweep that gives it the lowest
# validation NELBO; the figures go to bench/finetune*.json, which the notebook reads.
#   python bench.py finetune --stage=all --jobs=2 --threads=1   # every stage below, in order
#   python bench.py finetune --stage=steptime                   # a timing (stages steptime, decode: run them alone)
# ---------------------------------------------------------------------------------------

FT_STAGES = ("pretrain", "sweep", "variants", "steptime", "long", "frontier", "eval", "decode", "probe")
FT_STEPS = 300  # the short fine-tuning budget, in steps of batch 32
# The AR pretrained on the text; every fine-tuned model takes its width and depth. N = 8, so
# that E2D2 with N_dec = 2 can decode up to (T N + N) / (T N_dec + N_enc) = 3x faster than
# BD3-LM per block at B = T = 8 (N = 4 would allow 1.8x at most).
FT_PRETRAIN = ["--model=ar", "--data={dir}/topics.txt", "--seq_len=96", "--d_model=128",
               "--n_heads=4", "--n_enc=8", "--batch_size=32", "--max_steps=1200", "--warmup_steps=100", "--lr=2e-3",
               "--eval_every=200", "--eval_batches=4", "--eval_draws=1"]
FT_COMMON = ["--data={dir}/vowels_train.jsonl", "--seq_len=96", "--batch_size=32", "--warmup_steps=30",
             "--eval_every=75", "--eval_examples=64", "--eval_batches=2", "--eval_draws=1", "--keep_evals"]

def e2d2_decoder(decoder: str, tie: bool, where: str) -> tuple:
    """(run name, flags) of an E2D2 whose N_dec = 2 decoder layers come from the AR this way."""
    name = f"e2d2-{decoder}-{'tied' if tie else 'untied'}-{where}"
    return name, ["--model=e2d2", f"--decoder={decoder}", f"--tie_decoder={tie}", f"--decoder_layers={where}", "--n_dec=2"]


# The decoders compared: the paper's fine-tuning recipe (shared_kv, tied, top), each of its
# three choices changed alone, and the decoder --init_from gave before (hidden, untied, top).
FT_DECODERS = dict(e2d2_decoder(*v) for v in [("shared_kv", True, "top"), ("hidden", False, "top"),
                                              ("shared_kv", True, "bottom"), ("shared_kv", False, "top")])
# the models whose learning rate is swept (min_lr = lr / 10): the paper's E2D2 over three
# values (3e-4 was clearly the worst, so the others start at 1e-3), BD3-LM and AR over two,
# MDLM at one (its second run did not fit the time); the other decoders train at the paper's best
FT_SWEPT = {"e2d2-paper": (FT_DECODERS["e2d2-shared_kv-tied-top"], (3e-4, 1e-3, 3e-3)),
            "bd3lm": (["--model=bd3lm"], (1e-3, 3e-3)),
            "ar": (["--model=ar"], (1e-3, 3e-3)), "mdlm": (["--model=mdlm"], (3e-3,))}
# a tiny version of all of it, for the tests (every stage runs in seconds)
FT_QUICK = {"pretrain": ["--d_model=32", "--n_enc=2", "--max_steps=4", "--eval_every=4", "--batch_size=8"],
            "common": ["--max_steps=3", "--eval_every=3", "--batch_size=8", "--eval_examples=4", "--eval_batches=1"],
            "lrs": (1e-3,), "test_examples": 4, "repeats": 1}


def ft_lrs(family: str, quick: bool) -> tuple:
    return FT_QUICK["lrs"] if quick else FT_SWEPT[family][1]


def ft_runs(stage: str, d: str, state: dict, quick: bool) -> dict:
    """The train.py runs of a stage: name -> flags. `state` holds what earlier stages chose
    (the best learning rates, the equal-time step count)."""
    def run(flags, lr, steps=FT_STEPS, block_len=8, init=True):
        extra = FT_QUICK["common"] if quick else []
        return [f.format(dir=d) for f in FT_COMMON] + flags + [
            f"--lr={lr:g}", f"--min_lr={lr / 10:g}", f"--max_steps={steps}", f"--block_len={block_len}",
            *([f"--init_from={d}/ar-pre/ckpt.pt"] if init else []), *extra]
    if stage == "pretrain":
        return {"ar-pre": [f.format(dir=d) for f in FT_PRETRAIN] + (FT_QUICK["pretrain"] if quick else [])}
    if stage == "sweep":  # every swept model x lr, then an AR from scratch (what pretraining is worth)
        runs = {f"{fam}-lr{lr:g}": run(flags, lr) for fam, (flags, _) in FT_SWEPT.items() for lr in ft_lrs(fam, quick)}
        return {**runs, "ar-scratch": run(["--model=ar"], 3e-3, init=False)}
    best = state["best_lr"]
    if stage == "variants":  # every other decoder at the paper recipe's learning rate
        return {name: run(flags, best["e2d2-paper"]) for name, flags in FT_DECODERS.items()
                if name != "e2d2-shared_kv-tied-top"}
    recipe, lr = FT_DECODERS[state["recipe"]], best["e2d2-paper"]
    if stage == "long":  # E2D2 for as long as BD3-LM's FT_STEPS take at the same B (each with its own schedule)
        if set(ft_equal_time(quick)) - set(state.get("equal_time_steps", {})):
            raise ValueError("the long stage needs the step times of its models: run --stage=steptime first")
        return {name: run([*recipe[:-1], f"--n_dec={k}"], lr, steps=state["equal_time_steps"][name], block_len=B)
                for name, (k, B) in ft_equal_time(quick).items()}
    if stage == "frontier":  # the recipe at N_dec 1, 2, N/2 and blocks of 4, 8 (N_dec 2 at 8: the recipe's
        half = (2 if quick else 8) // 2  # own run); BD3-LM at 4. Blocks of 8 first, then of 4
        grid = [(k, 8) for k in sorted({1, half} - {2})] + [(2, 4), (0, 4)] + [(k, 4) for k in sorted({1, half} - {2})]
        return {f"frontier-ndec{k}-B{B}" if k else "frontier-bd3lm-B4":
                run([*recipe[:-1], f"--n_dec={k}"], lr, block_len=B) if k else run(["--model=bd3lm"], best["bd3lm"], block_len=4)
                for k, B in grid}
    raise ValueError(f"no runs in stage {stage}")


def ft_equal_time(quick: bool) -> dict:
    """The long stage's runs, name -> (N_dec, B): the recipe's decoder with N_dec = 2 (the
    depth of the decoder comparisons) and N / 2 (train.INIT_RECIPE's), each trained for as
    long as BD3-LM's FT_STEPS take with blocks of the same B."""
    half = (2 if quick else 8) // 2
    return {f"e2d2-ndec{k}-B{B}-equal-time": (k, B) for k, B in [(2, 8), (half, 8), (half, 4)]}


def steptime_kinds(recipe: list, quick: bool) -> dict:
    """What ft_steptime times, name -> (ModelConfig fields, B): every baseline and each E2D2
    decoder at B = 8, and the long stage's E2D2 and BD3-LM at their block lengths."""
    kinds = {**{name: (dict(model=name), 8) for name in MODELS if name != "e2d2"},
             **{name: (flags_to_config(flags), 8) for name, flags in FT_DECODERS.items()}}
    for k, B in ft_equal_time(quick).values():
        kinds[f"e2d2-ndec{k}-B{B}"] = ({**flags_to_config(recipe), "n_dec": k}, B)
        kinds["bd3lm" if B == 8 else f"bd3lm-B{B}"] = (dict(model="bd3lm"), B)
    return kinds


def run_dir(d: str, name: str) -> str:
    return os.path.join(d, "runs", name) if name != "ar-pre" else os.path.join(d, name)


def ft_train(runs: dict, d: str, jobs: int, threads: int) -> None:
    """Train every run that has not finished, `jobs` at a time: a finished run (its
    checkpoint at max_steps) is kept, an unfinished one resumed."""
    root = os.path.dirname(os.path.abspath(__file__))
    todo = []
    for name, flags in runs.items():
        out = run_dir(d, name)
        steps = int(next(f for f in flags[::-1] if f.startswith("--max_steps=")).split("=")[1])
        ckpt = os.path.join(out, "ckpt.pt")
        if os.path.exists(ckpt) and load_checkpoint(ckpt, "cpu")["step"] >= steps:
            continue
        go_on = ["--resume"] if os.path.exists(ckpt) else ["--overwrite"]
        todo.append((name, [sys.executable, os.path.join(root, "train.py"), *flags, f"--out_dir={out}", *go_on,
                            *([f"--threads={threads}"] if threads else [])]))
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            name, cmd = todo.pop(0)
            os.makedirs(run_dir(d, name), exist_ok=True)
            log = open(run_dir(d, name) + ".log", "w")
            print(f"training {name}", flush=True)
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})))
        time.sleep(1)
        for name, proc in [r for r in running if r[1].poll() is not None]:
            running.remove((name, proc))
            if proc.returncode != 0:
                raise ValueError(f"train.py for {name} failed (exit code {proc.returncode}); see {run_dir(d, name)}.log")
            print(f"finished {name}", flush=True)


def ft_step(d: str, name: str) -> int:
    return load_checkpoint(os.path.join(run_dir(d, name), "ckpt.pt"), "cpu")["step"]


def ft_val_nelbo(d: str, name: str) -> float:
    return load_checkpoint(os.path.join(run_dir(d, name), "ckpt.pt"), "cpu")["metrics"]["val_nelbo"]


def ft_val_nelbo_se(d: str, name: str) -> float:
    return load_checkpoint(os.path.join(run_dir(d, name), "ckpt.pt"), "cpu")["metrics"]["val_nelbo_se"]


def ft_state(d: str, quick: bool, speed: Optional[dict]) -> dict:
    """What the finished stages chose: each swept model's learning rate (the lowest
    validation NELBO at the end of its run: the training file's held-out pairs, never the
    test set), the recipe (the paper's decoder, unless another of FT_DECODERS at the paper's
    learning rate has a validation NELBO lower by more than two standard errors of the
    difference: a win inside the noise of 64 pairs does not move the default) and, once the
    speeds are known, the step count of each long-stage run (ft_equal_time): as many E2D2
    steps as take the time of BD3-LM's FT_STEPS at the same block length."""
    state = {"best_lr": {}}
    for fam in FT_SWEPT:
        lrs = ft_lrs(fam, quick)
        if all(os.path.exists(os.path.join(run_dir(d, f"{fam}-lr{lr:g}"), "ckpt.pt")) for lr in lrs):
            state["best_lr"][fam] = min(lrs, key=lambda lr: ft_val_nelbo(d, f"{fam}-lr{lr:g}"))
    if "e2d2-paper" in state["best_lr"]:
        lr = state["best_lr"]["e2d2-paper"]
        names = {n: f"e2d2-paper-lr{lr:g}" if n == "e2d2-shared_kv-tied-top" else n for n in FT_DECODERS}
        state["decoder_runs"] = names  # variant -> the run that trained it at that lr
        if all(os.path.exists(os.path.join(run_dir(d, r), "ckpt.pt")) for r in names.values()):
            paper = "e2d2-shared_kv-tied-top"

            def handicapped(n):  # another decoder's NELBO + 2 standard errors of its difference from the paper's
                if n == paper:
                    return ft_val_nelbo(d, names[n])
                se_diff = math.hypot(ft_val_nelbo_se(d, names[n]), ft_val_nelbo_se(d, names[paper]))
                return ft_val_nelbo(d, names[n]) + 2 * se_diff
            state["recipe"] = min(names, key=handicapped)
    if speed and "recipe" in state:  # each fixed by the first step timing that has it (a later one leaves the run as it is)
        step, fixed = {k: v["median"] for k, v in speed["train_step_s"].items()}, speed.get("equal_time_steps", {})
        state["equal_time_steps"] = {
            name: fixed.get(name) or round(FT_STEPS * step["bd3lm" if B == 8 else f"bd3lm-B{B}"] / step[f"e2d2-ndec{k}-B{B}"])
            for name, (k, B) in ft_equal_time(quick).items() if name in fixed or f"e2d2-ndec{k}-B{B}" in step}
    return state


def ft_task(d: str, quick: bool) -> dict:
    """Write the text and the task's files into d (once), and what a model that answers
    nothing but the prompt scores on each candidate task: why the vowels task was chosen."""
    if not os.path.exists(os.path.join(d, "vowels_test.jsonl")):
        os.makedirs(d, exist_ok=True)
        data.write_pydoc_task(os.path.join(d, "vowels_train.jsonl"), os.path.join(d, "vowels_test.jsonl"),
                              os.path.join(d, "topics.txt"))
    out = {}
    for task in data.PYDOC_TASKS:  # the copy-the-prompt baseline of every candidate (in memory)
        with tempfile.TemporaryDirectory() as tmp:
            n_train, n_test = data.write_pydoc_task(os.path.join(tmp, "a.jsonl"), os.path.join(tmp, "b.jsonl"), task=task)
            pairs = data.read_pairs(os.path.join(tmp, "b.jsonl"))
        src, ref = [s for s, _ in pairs], [t for _, t in pairs]
        out[task] = {"train": n_train, "test": n_test, "copy_chrf": 100 * data.chrf(src, ref),
                     "copy_bleu": 100 * data.corpus_bleu(src, ref), "example": pairs[0]}
    return out


def ft_test_pairs(d: str, quick: bool) -> list:
    pairs = data.read_pairs(os.path.join(d, "vowels_test.jsonl"))
    return pairs[:FT_QUICK["test_examples"]] if quick else pairs


def ft_eval(d: str, names: list, quick: bool) -> dict:
    """Every finished run on the test pairs: exact match, BLEU, chrF at T = B steps per block
    (and T = B/2 for the block models), its validation curve and three answers."""
    pairs, tok = ft_test_pairs(d, quick), data.ByteTokenizer()
    rows = {}
    for name in tqdm(names, desc="eval"):
        ckpt = load_checkpoint(os.path.join(run_dir(d, name), "ckpt.pt"), "cpu")
        model, tc = model_from_checkpoint(ckpt, "cpu"), ckpt["train_config"]
        cfg = model.cfg
        B = cfg.block_len
        tests = {}
        for T in block_steps(model):
            r = answer_pairs(model, pairs, tok, steps=T)
            tests[str(T or "default")] = {k: r[k] for k in ("exact_match", "bleu", "chrf", "rouge_l")}
            answers = r["answers"][:3]
        with open(os.path.join(run_dir(d, name), "log.jsonl")) as f:
            curve = [(e["step"], e["val_nelbo"], e["val_nelbo_se"]) for e in map(json.loads, f) if "val_nelbo" in e]
        rows[name] = {"model": cfg.model, "n_enc": cfg.n_enc, "n_dec": cfg.n_dec, "decoder": cfg.decoder,
                      "decoder_layers": cfg.decoder_layers, "tie_decoder": cfg.tie_decoder, "block_len": B,
                      "params": model.num_params(), "lr": tc["lr"], "steps": ckpt["step"],
                      "init_from": bool(tc["init_from"]), "val_nelbo": ckpt["metrics"]["val_nelbo"],
                      "val_curve": curve, "test": tests, "answers": list(zip([s for s, _ in pairs[:3]], answers))}
    return rows


def ft_steptime(d: str, quick: bool, repeats: int, recipe: list) -> dict:
    """Seconds per training step (batch 32 of the task, forward + backward + AdamW) of each
    model at the sizes of the runs, on random weights: alternating rounds, the median and
    the spread of `repeats`. Training time = steps x this (runs made side by side on a shared
    machine have no clean wall time)."""
    ckpt = load_checkpoint(os.path.join(d, "ar-pre", "ckpt.pt"), "cpu")
    arch = {k: ckpt["config"][k] for k in ("d_model", "n_heads", "n_enc")}
    ds, _ = data.load_dataset({**FT_SETTINGS, "data": os.path.join(d, "vowels_train.jsonl")}, 8, 96)
    steps = {}
    for name, (over, B) in steptime_kinds(recipe, quick).items():
        batch = ds.collate(ds.train_examples(8 if quick else 32, 0, 0), B, 96)  # the same pairs, in blocks of B
        torch.manual_seed(0)
        model = build_model(ModelConfig(**{**arch, **over, "seq_len": 96, "block_len": B}))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)

        def step(model=model, opt=opt, g=g, batch=batch):
            model(batch.x0, batch.prompt_mask, generator=g).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # warm-up
        steps[name] = step
    order, times = list(steps), {name: [] for name in steps}
    for r in tqdm(range(repeats), desc="step time"):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(timed(steps[name], "cpu")[1])
    return {name: spread(t) for name, t in times.items()}


def flags_to_config(flags: list) -> dict:
    """ModelConfig fields from train.py flags ["--n_dec=2", "--tie_decoder=True", ...]."""
    types = {f.name: f.type for f in fields(ModelConfig)}
    out = {}
    for flag in flags:
        k, v = flag[2:].split("=", 1)
        out[k] = v == "True" if types[k] is bool else types[k](v)
    return out


def spread(times: list) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def ft_decode(d: str, names: list, quick: bool, repeats: int) -> dict:
    """Decoding tokens/s of each trained run on the first 8 test prompts, one prompt at a
    time (batch 1, as the paper measures) and all 8 in one batch, T = B and T = B/2 steps
    per block (block models), greedy, stopping at [EOS]: alternating rounds, median and spread."""
    prompts = [data.ByteTokenizer().encode(s) for s, _ in ft_test_pairs(d, quick)[:8]]
    jobs = {}
    for name in names:
        model = model_from_checkpoint(load_checkpoint(os.path.join(run_dir(d, name), "ckpt.pt"), "cpu"), "cpu")
        B = model.cfg.block_len
        for T in block_steps(model):
            def one_by_one(model=model, T=T):
                return sum(generate(model, [p], steps=T).new_tokens for p in prompts)

            def batched(model=model, T=T):
                return generate(model, prompts, steps=T).new_tokens
            jobs[(name, str(T or "default"), 1)], jobs[(name, str(T or "default"), len(prompts))] = one_by_one, batched
    for fn in jobs.values():
        fn()  # warm-up
    order, rates = list(jobs), {key: [] for key in jobs}
    for r in tqdm(range(repeats), desc="decode"):
        for key in (order if r % 2 == 0 else order[::-1]):
            tokens, s = timed(jobs[key], "cpu")
            rates[key].append(tokens / s)
    out = {}
    for (name, T, batch), r in rates.items():
        out.setdefault(name, {}).setdefault(T, {})[f"batch{batch}"] = spread(r)
    return out


FT_SETTINGS = dict(task="", digits=0, data_format="auto", val_fraction=0.1, too_long="skip", tokenizer="bytes")


@torch.no_grad()
def read_the_prompt(model, x0, prompt_mask, generator) -> dict:
    """Where the noisy tokens look, and how well they are predicted, for an E2D2 or a BD3-LM
    model on a batch (x0, prompt_mask) noised as in training: per layer that reads the noisy
    tokens (E2D2: the decoder; BD3-LM: all N), the attention mass that a [MASK] query puts on
    the prompt's keys, on earlier answer blocks and on its own block (averaged over heads and
    queries); and the masked cross-entropy by answer block (0 = the first after the prompt)."""
    cfg, B = model.cfg, model.cfg.block_len
    b, L = x0.shape
    target = (x0 != cfg.pad_id) & ~prompt_mask
    t = sample_t(b, L // B, cfg.t_min, cfg.t_max, generator)
    noised = q_sample(x0, target, t, B, cfg.mask_id, cfg.schedule, generator=generator)
    calls = []  # every Layer call: (layer, its arguments)
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((m, args))) for m in model.modules()
             if isinstance(m, Layer)]
    try:
        logits = model.logits(x0, noised.x_t, prompt_mask)  # (b, L, V)
    finally:
        for h in hooks:
            h.remove()
    # the calls that hold the noisy queries: E2D2's last N_dec (the decoder runs after the
    # encoder; queries = the L noisy tokens); BD3-LM's N, whose queries L..2L are the noisy half
    reads = calls[-cfg.n_dec:] if cfg.model == "e2d2" else calls
    keys_prompt = torch.cat([prompt_mask, torch.zeros_like(prompt_mask)], 1)  # (b, 2L): clean prompt keys
    keys_answer = torch.cat([target, torch.zeros_like(target)], 1)  # clean answer keys
    keys_own = torch.cat([torch.zeros_like(target), torch.ones_like(target)], 1)  # noisy keys (own block)
    queries = noised.masked  # (b, L): [MASK] queries only
    mass = {"prompt": [], "earlier_blocks": [], "own_block": []}
    for layer, args in reads:
        w = attention_weights(layer, *args).mean(1)  # (b, n, 2L), heads averaged
        w = w[:, -L:]  # BD3-LM: the noisy half of its queries
        for key, cols in (("prompt", keys_prompt), ("earlier_blocks", keys_answer), ("own_block", keys_own)):
            mass[key].append(((w * cols[:, None, :]).sum(-1)[queries].mean()).item())
    nll = -subs_log_probs(logits, noised.x_t, cfg.mask_id).gather(-1, x0[..., None]).squeeze(-1)  # (b, L)
    block = (torch.arange(L) - prompt_mask.sum(1, keepdim=True)).div(B, rounding_mode="floor")  # answer block index
    by_block = [nll[queries & (block == k)].mean().item() for k in range(int(block.max()) + 1)
                if (queries & (block == k)).any()]
    return {"attention": mass, "loss_by_block": by_block}


def ft_probe(d: str, names: list, quick: bool) -> dict:
    """read_the_prompt along training: at the initialisation (the AR's weights, step 0) and
    at every kept checkpoint, on 64 held-out pairs of the training file, 4 draws of the noise."""
    ds, _ = data.load_dataset({**FT_SETTINGS, "data": os.path.join(d, "vowels_train.jsonl")}, 8, 96)
    out = {}
    for name in names:
        folder = run_dir(d, name)
        steps = sorted(int(f[5:-3]) for f in os.listdir(folder) if f.startswith("ckpt_") and f.endswith(".pt"))
        last = load_checkpoint(os.path.join(folder, "ckpt.pt"), "cpu")
        rows = []
        for step in [0, *steps]:
            if step == 0:  # the model as --init_from made it
                torch.manual_seed(last["train_config"]["seed"])
                model = build_model(config_from_dict(last["config"])).eval()
                init_from_checkpoint(model, load_checkpoint(last["train_config"]["init_from"], "cpu"))
            else:
                model = model_from_checkpoint(load_checkpoint(os.path.join(folder, f"ckpt_{step}.pt"), "cpu"), "cpu")
            batch = ds.collate(ds.val_examples(8 if quick else 64), model.cfg.block_len, model.cfg.seq_len)
            g = torch.Generator().manual_seed(0)
            draws = [read_the_prompt(model, batch.x0, batch.prompt_mask, g) for _ in range(1 if quick else 4)]
            mean = lambda xs: [sum(v) / len(v) for v in zip(*xs)]  # noqa: E731  (over the draws)
            rows.append({"step": step, "attention": {k: mean([r["attention"][k] for r in draws]) for k in draws[0]["attention"]},
                         "loss_by_block": mean([r["loss_by_block"] for r in draws])})
        out[name] = rows
    return out


def finetune(stage: str, d: str, jobs: int, threads: int, quick: bool, json_dir: str, repeats: int) -> dict:
    """Run one stage of the walk-through (or all of them, in FT_STAGES order); each training
    stage skips the runs already finished. The figures go to json_dir/finetune.json (the
    task, the choices, every run on the test set), finetune_speed.json (step times, decoding
    tokens/s) and finetune_probe.json (read_the_prompt along training)."""
    if stage != "all" and stage not in FT_STAGES:
        raise ValueError(f"--stage must be all or one of {FT_STAGES}, got {stage!r}")
    paths = {k: os.path.join(json_dir, f"finetune{k}.json") for k in ("", "_speed", "_probe")}
    load = lambda p: json.load(open(p)) if os.path.exists(p) else {}  # noqa: E731
    task = ft_task(d, quick)
    for st in (FT_STAGES if stage == "all" else [stage]):
        speed = load(paths["_speed"])
        state = ft_state(d, quick, speed if speed.get("train_step_s") else None)
        print(f"--- stage {st}; so far: {state}", flush=True)
        if st in ("pretrain", "sweep", "variants", "long", "frontier"):
            if st == "long":  # the step counts the long runs were given (kept by later step timings)
                write_json(paths["_speed"], {**speed, "equal_time_steps": state["equal_time_steps"]})
            ft_train(ft_runs(st, d, state, quick), d, jobs, threads)
            continue
        done = sorted(n for n in os.listdir(os.path.join(d, "runs")) if os.path.exists(os.path.join(d, "runs", n, "ckpt.pt")))
        if st == "steptime":
            write_json(paths["_speed"], {**speed, "train_step_s": ft_steptime(d, quick, repeats, FT_DECODERS[state["recipe"]]),
                                         "threads": torch.get_num_threads(), "load_before": os.getloadavg()})
        elif st == "decode":  # the runs of the tables: each model at its best lr, every decoder, the frontier
            shown = [f"{fam}-lr{lr:g}" for fam, lr in state["best_lr"].items()] + list(state["decoder_runs"].values())
            shown = sorted((set(shown) | {n for n in done if n.startswith("frontier") or n.endswith("equal-time")}) & set(done))
            write_json(paths["_speed"], {**speed, "decode_tokens_per_s": ft_decode(d, shown, quick, repeats),
                                         "threads": torch.get_num_threads()})
        elif st == "eval":  # a run already scored at the same step is kept (delete the file to score all again)
            old = load(paths[""]).get("runs", {})
            keep = {n: r for n, r in old.items() if n in done and r["steps"] == ft_step(d, n)}
            runs = {**keep, **ft_eval(d, [n for n in done if n not in keep], quick)}
            write_json(paths[""], {"task": task, "state": state, "steps": FT_STEPS, "runs": dict(sorted(runs.items()))})
        elif st == "probe":
            names = [f"bd3lm-lr{state['best_lr']['bd3lm']:g}", *state["decoder_runs"].values(),
                     *(n for n in done if n.startswith("frontier-ndec"))]  # and the deeper/shallower decoders
            write_json(paths["_probe"], ft_probe(d, sorted(set(names) & set(done)), quick))  # those trained so far
    return ft_state(d, quick, load(paths["_speed"]) or None)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix (--repeat) is not taken for a flag; for compare it is
    # passed on to train.py, which refuses it by name
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("what", choices=["train", "sample", "speedup", "compare", "finetune", "race"],
                   help="which benchmark")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="train, sample: precision, bf16 autocast on CUDA and float32 on the CPU (auto), or float32, "
                        "or bfloat16; compare passes it to train.py; speedup times float32 (default auto)")
    p.add_argument("--out", default="", help="also write the figures to this JSON file (default: none); "
                   "race: the page, an HTML file (default race.html)")
    p.add_argument("--batch", type=int, default=8, help="train: sequences per step, >= 1 (default 8)")
    p.add_argument("--batches", default="1,8", help="sample: batch sizes >= 1, comma-separated (default 1,8)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs (median), >= 1 (default: train 5, sample 3)")
    p.add_argument("--out_dir", default="", help="compare, race, finetune: where each model's run goes "
                   "(default out-compare, out-compare, out-finetune)")
    p.add_argument("--stage", default="all", help=f"finetune: all, or one of {', '.join(FT_STAGES)} (default all)")
    p.add_argument("--jobs", type=int, default=1, help="finetune: training runs at a time, >= 1 (default 1)")
    p.add_argument("--json_dir", default="bench", help="finetune: where its figures go (default bench)")
    p.add_argument("--quick", action="store_true", help="finetune: tiny models and a few steps (a test of the code)")
    p.add_argument("--against", default="", help="speedup: the git commit whose samplers this code is timed against")
    p.add_argument("--compile", action="store_true",
                   help="speedup: also time E2D2 after models.compile_for_sampling (sample.py --compile)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch, >= 0; 0 = torch's default (default 0). Figures are only "
                        "comparable at the same thread count; 1 on a busy or shared machine")
    return p


def main(argv=None):
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    trains = args.what in ("compare", "race")
    if rest and not trains:  # only compare and race pass flags on (to train.py)
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    given = list(rest)  # the training flags the user gave
    if trains and args.device != "auto":
        rest.append(f"--device={args.device}")  # train.py picks the device of each run
    if trains and args.threads:
        rest.append(f"--threads={args.threads}")  # and sets the threads of each run
    if trains and args.dtype != "auto":
        rest.append(f"--dtype={args.dtype}")  # and its precision
    try:
        try:
            batches = [int(b) for b in args.batches.split(",")]
        except ValueError:  # "1,x" or "1,,8": reported below with the rule
            batches = []
        bad = [f"--{name}={value} must be {rule}" for name, value, ok, rule in [
            ("batch", args.batch, args.batch >= 1, ">= 1"),
            ("batches", args.batches, batches and min(batches) >= 1, "batch sizes >= 1, comma-separated"),
            ("repeats", args.repeats, args.repeats is None or args.repeats >= 1, ">= 1"),
            ("jobs", args.jobs, args.jobs >= 1, ">= 1"),
            ("threads", args.threads, args.threads >= 0, ">= 0 (0 = torch's default)")] if not ok]
        if bad:
            raise ValueError("; ".join(bad))
        if args.threads:
            torch.set_num_threads(args.threads)
        device = pick_device(args.device)
        if args.what == "train":
            return bench_training(args.batch, args.repeats or 5, device, out=args.out, dtype=args.dtype)
        if args.what == "speedup":
            if not args.against:
                raise ValueError("speedup needs --against=COMMIT (a git commit of this repository)")
            if device != "cpu":
                raise ValueError(f"speedup measures the CPU (threads, memory bandwidth); got --device={args.device}")
            if args.dtype == "bfloat16":
                raise ValueError("speedup times the float32 samplers (its limits assume float32 weights); "
                                 "drop --dtype=bfloat16")
            return bench_speedup(args.against, batches, args.repeats or 5, args.out, args.compile)
        if args.what == "sample":
            return bench_sampling(batches, args.repeats or 3, device, args.out, args.dtype)
        if args.what == "finetune":
            return finetune(args.stage, args.out_dir or "out-finetune", args.jobs, args.threads, args.quick,
                            args.json_dir, args.repeats or (FT_QUICK["repeats"] if args.quick else 7))
        if args.what == "race":
            if any(f.startswith("--model") for f in rest):
                raise ValueError("race trains every model type; drop --model")
            return race(given, rest, args.out_dir or "out-compare", args.out or "race.html",
                        args.repeats or 5, args.threads, args.device)
        return compare(rest, args.out_dir or "out-compare", args.out)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
