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

(The fine-tuning walk-through, a long experiment rather than a timing, is finetune.py.)

The models have random weights in `train` and `sample` (speed does not depend on what a
model has learned). Every timing is a median after warm-up runs; GPU work is waited for
before the clock is read. The analytic costs count what each model runs (layer calls and
layer-token passes); tests check those counts against hooks on the real layers.
"""

import argparse
import importlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from e2d2 import Layer, ModelConfig, generate
from models import (DTYPES, MODEL_TYPES, MODELS, autocast_for, build_model, compile_for_sampling, is_cuda,
                    load_checkpoint, model_from_checkpoint, model_spec, peak_bf16_tflops, pick_device, sampling_cost,
                    timed, train_flops_per_token, upgrade_state_dict, write_json)

ROOT = os.path.dirname(os.path.abspath(__file__))  # where the scripts are (compare and race run them)


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


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix (--repeat) is not taken for a flag; for compare it is
    # passed on to train.py, which refuses it by name
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("what", choices=["train", "sample", "speedup", "compare", "race"], help="which benchmark")
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
    p.add_argument("--out_dir", default="out-compare", help="compare, race: where each model's run goes "
                   "(default out-compare)")
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
        if args.what == "race":
            if any(f.startswith("--model") for f in rest):
                raise ValueError("race trains every model type; drop --model")
            return race(given, rest, args.out_dir, args.out or "race.html", args.repeats or 5, args.threads, args.device)
        return compare(rest, args.out_dir, args.out)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
