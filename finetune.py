"""
The fine-tuning walk-through (docs/finetuning.md; notebooks/06_finetuning.ipynb draws its
figures): a pretrained AR model fine-tuned into every model type on a conditional task,
restoring the vowels of a phrase of the Python documentation (data.write_pydoc_task). An
AR model is pretrained on the documentation's text, then every model is fine-tuned from
it with the same budget, each at the learning rate of a small sweep that gives it the
lowest validation NELBO; the figures go to bench/finetune*.json, which the notebook reads.

    python finetune.py --out_dir=out-ft --json_dir=bench --jobs=2 --threads=1   # every stage, in order
    python finetune.py --stage=eval --out_dir=out-ft --json_dir=bench           # or one stage
    python finetune.py --stage=steptime    # a timing (stages steptime, decode: run them alone)
    python finetune.py --quick --out_dir=/tmp/ft   # tiny models, a few steps: a test of the code

Every run is a train.py command line (ft_runs); each training stage skips the runs already
finished and resumes the unfinished ones. The stages, in order (FT_STAGES): pretrain the AR;
sweep each model's learning rate; the other E2D2 decoders (variants); the step time of each
model (steptime); E2D2 for as long as BD3-LM's steps take (long); E2D2 at other N_dec and
block lengths (frontier); every run on the test pairs (eval); decoding tokens/s (decode);
where the noisy tokens look along training (probe).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from typing import Optional

import torch
from tqdm import tqdm

import data
from e2d2 import Layer, ModelConfig, generate, q_sample, sample_t, subs_log_probs
from models import (MODELS, answer_pairs, attention_weights, build_model, config_from_dict, init_from_checkpoint,
                    load_checkpoint, model_from_checkpoint, timed, write_json)

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


def block_steps(model) -> list:
    """The steps per block a quality table shows: T = B and B/2 for a model that samples in
    blocks of its block_len (E2D2, BD3-LM), its default alone otherwise (AR: one token per
    step, MDLM: one block of the whole answer)."""
    B = model.cfg.block_len  # asked of its runner, for an answer of two blocks: its own block length
    own = model.make_runner(torch.zeros(1, B, dtype=torch.long, device=model.embed.weight.device), False, 2 * B)
    return [B, B // 2] if own.block_len == B > 1 else [None]


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


# ---------------------------------------------------------------------------------------
# Two measurements docs/claims.md asks of the walk-through, a stage each (not part of "all"),
# each runnable from an empty out_dir: it takes the walk-through's choices (learning rates,
# decoder, equal-time step counts) from json_dir/finetune.json, trains what it needs that is
# not there yet (the pretrained AR first) and keeps every run it finds finished.
#   --stage=ar_speed  both AR models timed in one session with E2D2's and BD3-LM's
#                     equal-time points (blocks of 4): the AR on the frontier
#   --stage=seeds     the equal-time comparison of E2D2 and BD3-LM at each of FT_SEEDS
# The ordinary --stage=decode times the AR trained from scratch too (ft_decode_names).
# ---------------------------------------------------------------------------------------

FT_SEEDS = (1337, 1338, 1339)  # 1337 is train.py's default: the seed of every run of the walk-through
FT_SEED_BLOCKS = (4,)  # the block lengths compared: 4, the README's claim (add 8, the docs' second one, to repeat it too)


def ft_decode_names(state: dict, done: list) -> list:
    """The runs --stage=decode times, in one session: every model at its best learning rate,
    every decoder, the frontier, the equal-time runs, and the AR trained from scratch."""
    shown = [f"{fam}-lr{lr:g}" for fam, lr in state["best_lr"].items()] + list(state["decoder_runs"].values())
    shown += [n for n in done if n.startswith("frontier") or n.endswith("equal-time")] + ["ar-scratch"]
    return sorted(set(shown) & set(done))


def ft_recorded_state(d: str, quick: bool, json_dir: str) -> dict:
    """The walk-through's choices: as recorded in json_dir/finetune.json (what its tables were
    made with), or, failing that, as the finished stages in d give them."""
    path = os.path.join(json_dir, "finetune.json")
    recorded = json.load(open(path)).get("state", {}) if os.path.exists(path) else {}
    if "equal_time_steps" in recorded:
        return recorded
    speed_path = os.path.join(json_dir, "finetune_speed.json")
    speed = json.load(open(speed_path)) if os.path.exists(speed_path) else {}
    state = ft_state(d, quick, speed if speed.get("train_step_s") else None)
    if "equal_time_steps" not in state:
        raise ValueError(f"this stage needs the walk-through's choices: {path} (its state), or the stages up to "
                         f"long run in {d}")
    return state


def ft_seed_pairs(state: dict, quick: bool) -> dict:
    """B -> (E2D2 run, BD3-LM run) of the equal-time comparison: E2D2 with the recipe's depth
    N / 2 trained for BD3-LM's time (the long stage), BD3-LM for FT_STEPS at its best learning
    rate (B = 8: the sweep's run; B = 4: the frontier's)."""
    half = next(k for k, B in ft_equal_time(quick).values() if B == 4)  # the long stage's N / 2
    bd3lm = {8: f"bd3lm-lr{state['best_lr']['bd3lm']:g}", 4: "frontier-bd3lm-B4"}
    return {B: (f"e2d2-ndec{half}-B{B}-equal-time", bd3lm[B]) for B in FT_SEED_BLOCKS}


def seed_run(name: str, seed: int) -> str:
    """The run of `name` at `seed`: at FT_SEEDS[0] the walk-through's own run, else one under
    runs/seeds/ (out of the other stages' way: their listings of runs/ never see it)."""
    return name if seed == FT_SEEDS[0] else f"seeds/{name}-seed{seed}"


def ft_named_runs(d: str, state: dict, quick: bool) -> dict:
    """Every fine-tuning run of the walk-through, name -> train.py flags."""
    return {name: flags for stage in ("sweep", "variants", "long", "frontier")
            for name, flags in ft_runs(stage, d, state, quick).items()}


def ft_seed_runs(d: str, state: dict, quick: bool) -> dict:
    """The train.py runs of --stage=seeds, name -> flags: each run of ft_seed_pairs at every
    seed of FT_SEEDS, with the walk-through's flags (so the same steps) and --seed. The seed
    sets the order of the training pairs, the noise and the validation draws; the weights
    come from the same pretrained AR (the spread is over fine-tuning, not over pretraining)."""
    flags = ft_named_runs(d, state, quick)
    return {seed_run(name, seed): flags[name] + ([f"--seed={seed}"] if seed != FT_SEEDS[0] else [])
            for pair in ft_seed_pairs(state, quick).values() for name in pair for seed in FT_SEEDS}


def mean_sd(xs: list) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def ft_seed_table(rows: dict, state: dict, quick: bool) -> dict:
    """From every run's ft_eval row: per B, each model's validation NELBO (with its evaluation
    standard error) and test chrF (T = B and B / 2) per seed, their mean and standard deviation
    over seeds, and the paired differences E2D2 - BD3-LM (same seed, same test set) with the
    number of seeds E2D2 was ahead on."""
    out = {}
    for B, (e2d2, bd3lm) in ft_seed_pairs(state, quick).items():
        per = {}
        for model, name in (("e2d2", e2d2), ("bd3lm", bd3lm)):
            runs = [rows[seed_run(name, seed)] for seed in FT_SEEDS]
            per[model] = {"runs": [seed_run(name, seed) for seed in FT_SEEDS], "steps": [r["steps"] for r in runs],
                          "val_nelbo": [r["val_nelbo"] for r in runs],
                          "val_nelbo_se": [r["val_curve"][-1][2] for r in runs],  # the evaluation's own noise, per run
                          **{f"chrf_T{T}": [r["test"][str(T)]["chrf"] for r in runs] for T in (B, B // 2)}}
        figures = [k for k in per["e2d2"] if k == "val_nelbo" or k.startswith("chrf")]
        out[str(B)] = {**per, "summary": {m: {k: mean_sd(per[m][k]) for k in figures} for m in per},
                       "e2d2_minus_bd3lm": {k: mean_sd([a - b for a, b in zip(per["e2d2"][k], per["bd3lm"][k])]) for k in figures},
                       "e2d2_ahead_on_seeds": {k: sum((a < b) if k == "val_nelbo" else (a > b)
                                                      for a, b in zip(per["e2d2"][k], per["bd3lm"][k])) for k in figures}}
    return {"seeds": list(FT_SEEDS), "by_block_len": out}


def ft_prepare(d: str, jobs: int, threads: int, quick: bool, json_dir: str) -> dict:
    """The task's files and the pretrained AR in d (made once), and the walk-through's choices."""
    ft_task(d, quick)
    state = ft_recorded_state(d, quick, json_dir)
    ft_train(ft_runs("pretrain", d, state, quick), d, jobs, threads)
    return state


def ft_seeds(d: str, jobs: int, threads: int, quick: bool, json_dir: str) -> dict:
    """--stage=seeds: train ft_seed_runs, score every one on the test set (all of them now,
    so that every seed is scored by the same code) and write json_dir/finetune_seeds.json."""
    state = ft_prepare(d, jobs, threads, quick, json_dir)
    runs = ft_seed_runs(d, state, quick)
    ft_train(runs, d, jobs, threads)
    table = ft_seed_table(ft_eval(d, list(runs), quick), state, quick)
    write_json(os.path.join(json_dir, "finetune_seeds.json"), {**table, "threads": threads, "load_after": os.getloadavg()})
    return table


def ft_ar_speed(d: str, jobs: int, threads: int, quick: bool, json_dir: str, repeats: int) -> dict:
    """--stage=ar_speed: the AR trained from scratch and the fine-tuned AR (at its best rate)
    timed in one session with the equal-time E2D2 and BD3-LM with blocks of 4 (the frontier's
    best points), each scored on the test set: json_dir/finetune_ar_speed.json."""
    state = ft_prepare(d, jobs, threads, quick, json_dir)
    names = ["ar-scratch", f"ar-lr{state['best_lr']['ar']:g}", *ft_seed_pairs(state, quick)[4]]
    flags = ft_named_runs(d, state, quick)
    ft_train({name: flags[name] for name in names}, d, jobs, threads)
    out = {"test": ft_eval(d, names, quick), "decode_tokens_per_s": ft_decode(d, names, quick, repeats),
           "threads": torch.get_num_threads(), "load_after": os.getloadavg()}
    write_json(os.path.join(json_dir, "finetune_ar_speed.json"), out)
    return out


# ---------------------------------------------------------------------------------------
# The recipe protocol: does train.INIT_RECIPE hold beyond the task it was chosen on? Every
# setting swept below is fine-tuned from an AR pretrained on each task's text, at two
# budgets (RECIPE_BUDGETS steps, each run with its own schedule: a 1200-step run is not a
# 300-step run continued), and scored on the task's test pairs (chrF, greedy, T = B). A
# default is then picked per model by its WORST cell: the setting whose lowest ratio to the
# best setting of its model in a (task, budget) cell is highest. A sweep read at one cell
# can favour what a longer run pays for (a high learning rate), and a rule that takes the
# best cell inherits that.
#   python finetune.py --stage=recipe --out_dir=out-recipe --json_dir=bench --jobs=2 --threads=1
#   python finetune.py --stage=recipe --cells=docstrings:300 ...   # one cell's runs only
#   python finetune.py --stage=recipe_table --out_dir=out-recipe   # score what is finished
# Each task has its own folder under out_dir (its files, ar-pre/, runs/); the 300-step
# cells train first. --stage=recipe trains what is missing (or what --cells names), scores
# every finished run once (kept in its folder as score.json) and writes
# json_dir/finetune_recipe.json with the four-cell table; recipe_table only scores and writes.
# ---------------------------------------------------------------------------------------

# The two tasks: what differs between them is what the recipe might depend on: the text,
# the answers' length, the AR's depth N (so N_dec = N / 2 is 4 or 2) and the data's size.
RECIPE_TASKS = {
    # the walk-through's own task: phrases of pydoc_data.topics (the language reference),
    # answers of 48 characters on average, 27.9k training pairs, an AR of N = 8
    "pydoc": dict(text="pydoc", seq_len=96, pretrain=FT_PRETRAIN, test_pairs=285),
    # phrases of the standard library's docstrings (data.stdlib_docstrings_text: prose about
    # APIs), seq_len 128: answers of 59 characters on average, 129k training pairs (the
    # 1200-step runs see less than one epoch), an AR of N = 4, the first 400 test pairs
    "docstrings": dict(text="docstrings", seq_len=128, test_pairs=400,
                       pretrain=[f for f in FT_PRETRAIN if not f.startswith(("--n_enc", "--seq_len"))] +
                       ["--n_enc=4", "--seq_len=128"]),
}
RECIPE_BUDGETS = (300, 1200)  # fine-tuning steps of batch 32
RECIPE_LRS = (1e-3, 2e-3, 3e-3)  # every model's peak learning rate (min_lr = lr / 10)
# setting -> train.py flags (E2D2's N_dec = N / 2 of the task's AR, the top layers)
RECIPE_SETTINGS = {
    "e2d2-hidden-untied": ["--model=e2d2", "--decoder=hidden", "--tie_decoder=False", "--decoder_layers=top"],
    "e2d2-shared_kv-tied": ["--model=e2d2", "--decoder=shared_kv", "--tie_decoder=True", "--decoder_layers=top"],
    "bd3lm": ["--model=bd3lm"],
    "ar": ["--model=ar"],
}
RECIPE_QUICK = {"budgets": (3, 6), "lrs": (1e-3, 3e-3), "test_pairs": 4}


def recipe_plan(quick: bool) -> tuple:
    """(budgets, learning rates): the protocol's, or the tiny ones of --quick."""
    return (RECIPE_QUICK["budgets"], RECIPE_QUICK["lrs"]) if quick else (RECIPE_BUDGETS, RECIPE_LRS)


def recipe_model(setting: str) -> str:
    return setting.split("-")[0]  # "e2d2-hidden-untied" -> "e2d2"


def recipe_runs(out: str, task: str, budget: int, quick: bool) -> dict:
    """The train.py runs of one cell (task, budget), name -> flags: every setting at every
    learning rate, fine-tuned from the task's pretrained AR with the walk-through's flags."""
    spec, d = RECIPE_TASKS[task], os.path.join(out, task)
    n = int([f for f in recipe_pretrain(d, task, quick) if f.startswith("--n_enc=")][-1].split("=")[1])  # the AR's N
    common = [f.replace("--seq_len=96", f"--seq_len={spec['seq_len']}").format(dir=d) for f in FT_COMMON]
    runs = {}
    for setting, flags in RECIPE_SETTINGS.items():
        for lr in recipe_plan(quick)[1]:
            half = [f"--n_dec={(n + 1) // 2}"] if recipe_model(setting) == "e2d2" else []
            runs[f"{setting}-lr{lr:g}-{budget}"] = common + flags + half + [
                f"--lr={lr:g}", f"--min_lr={lr / 10:g}", f"--max_steps={budget}", "--block_len=8",
                f"--eval_every={max(budget // 4, 1)}", f"--init_from={d}/ar-pre/ckpt.pt",
                *(FT_QUICK["common"][2:] if quick else [])]  # (--quick: its own steps, then its small batch)
    return runs


def recipe_pretrain(d: str, task: str, quick: bool) -> list:
    """The train.py flags of the task's AR, pretrained on its text (d/text.txt)."""
    flags = [f.replace("topics.txt", "text.txt").format(dir=d) for f in RECIPE_TASKS[task]["pretrain"]]
    return flags + (FT_QUICK["pretrain"] if quick else [])


def recipe_task(out: str, task: str, quick: bool) -> str:
    """The task's folder with its files (written once): vowels_train.jsonl, vowels_test.jsonl
    and the text to pretrain on, and the copy-the-prompt chrF of its test pairs."""
    spec, d = RECIPE_TASKS[task], os.path.join(out, task)
    if not os.path.exists(os.path.join(d, "vowels_test.jsonl")):
        os.makedirs(d, exist_ok=True)
        data.write_pydoc_task(os.path.join(d, "vowels_train.jsonl"), os.path.join(d, "vowels_test.jsonl"),
                              os.path.join(d, "text.txt"), seq_len=spec["seq_len"], text=spec["text"])
    return d


def recipe_test_pairs(d: str, task: str, quick: bool) -> list:
    return data.read_pairs(os.path.join(d, "vowels_test.jsonl"))[:RECIPE_QUICK["test_pairs"] if quick
                                                                  else RECIPE_TASKS[task]["test_pairs"]]


def recipe_score(d: str, task: str, name: str, quick: bool) -> dict:
    """One finished run on the task's test pairs (greedy, T = B; AR: one token a step), kept
    in the run's folder as score.json and used again while the checkpoint's step is the same."""
    path, ckpt = os.path.join(run_dir(d, name), "score.json"), load_checkpoint(os.path.join(run_dir(d, name), "ckpt.pt"), "cpu")
    if os.path.exists(path):
        kept = json.load(open(path))
        if kept["steps"] == ckpt["step"]:
            return kept
    model = model_from_checkpoint(ckpt, "cpu")
    r = answer_pairs(model, recipe_test_pairs(d, task, quick), data.ByteTokenizer(),
                     steps=block_steps(model)[0])  # T = B for the block models, the default otherwise
    score = {"steps": ckpt["step"], "val_nelbo": ckpt["metrics"]["val_nelbo"], "val_nelbo_se": ckpt["metrics"]["val_nelbo_se"],
             "chrf": r["chrf"], "bleu": r["bleu"], "exact_match": r["exact_match"], "answers": r["answers"][:3]}
    write_json(path, score)
    return score


def recipe_choose(table: dict, models_of: dict) -> dict:
    """The default of each model by its worst cell. table: cell -> {setting-lr: chrF} (only
    complete cells: every setting scored); models_of: setting-lr -> model. For each model,
    each candidate's ratio to the best of that model's candidates in each cell; the default is
    the candidate whose lowest ratio is highest. Returns model -> {default, worst_ratio,
    worst_cell, by_candidate: {candidate: its lowest ratio}}."""
    out = {}
    for model in sorted(set(models_of.values())):
        cands = sorted(c for c, m in models_of.items() if m == model)
        ratios = {c: {cell: row[c] / max(max(row[o] for o in cands), 1e-9) for cell, row in table.items()} for c in cands}
        worst = {c: min(r.values()) for c, r in ratios.items()}
        best = max(cands, key=lambda c: worst[c])
        out[model] = {"default": best, "worst_ratio": worst[best], "worst_cell": min(ratios[best], key=ratios[best].get),
                      "by_candidate": worst}
    return out


def recipe(out: str, jobs: int, threads: int, quick: bool, json_dir: str, cells: list, train: bool = True) -> dict:
    """--stage=recipe (train, then score and tabulate) and --stage=recipe_table (score and
    tabulate what is finished): see the section's comment."""
    budgets = recipe_plan(quick)[0]
    every = [(task, b) for b in budgets for task in RECIPE_TASKS]  # the cheap cells first
    wanted = every if not cells else [c for c in every if f"{c[0]}:{c[1]}" in cells]
    for task, budget in every:
        d = recipe_task(out, task, quick)
        if train and (task, budget) in wanted:
            ft_train({"ar-pre": recipe_pretrain(d, task, quick)}, d, 1, threads)
            ft_train(recipe_runs(out, task, budget, quick), d, jobs, threads)
    rows, table = {}, {}  # cell -> {run: its score}; complete cell -> {setting-lr: chrF}
    for task, budget in every:
        d, cell = os.path.join(out, task), f"{task}:{budget}"
        done = {n: f for n, f in recipe_runs(out, task, budget, quick).items()
                if os.path.exists(os.path.join(run_dir(d, n), "ckpt.pt")) and ft_step(d, n) >= budget}
        rows[cell] = {n: recipe_score(d, task, n, quick) for n in tqdm(done, desc=f"score {cell}")}
        names = recipe_runs(out, task, budget, quick)
        if len(done) == len(names):  # a complete cell enters the choice
            table[cell] = {n.rsplit("-", 1)[0]: rows[cell][n]["chrf"] for n in names}  # (the budget cut off)
    models_of = {f"{s}-lr{lr:g}": recipe_model(s) for s in RECIPE_SETTINGS for lr in recipe_plan(quick)[1]}
    chosen = recipe_choose(table, models_of) if table else {}
    # E2D2's default (and today's INIT_RECIPE: shared-KV, tied, lr 3e-3) in every complete
    # cell, against BD3-LM's default and the best E2D2 setting there
    e2d2 = {"default": chosen["e2d2"]["default"], "init_recipe": "e2d2-shared_kv-tied-lr0.003"} if chosen else {}
    ratio = lambda a, b: a / b if b else None  # noqa: E731  (a run that answers nothing scores chrF 0)
    versus = {cell: {which: {"setting": c, "chrf": row[c], "to_bd3lm_default": ratio(row[c], row[chosen["bd3lm"]["default"]]),
                             "to_best_e2d2": ratio(row[c], max(row[o] for o, m in models_of.items() if m == "e2d2"))}
                     for which, c in e2d2.items() if c in row} for cell, row in table.items()}
    result = {"cells": rows, "complete_cells": sorted(table), "chrf_table": table, "chosen": chosen, "e2d2_versus": versus,
              "copy_chrf": {t: 100 * data.chrf(*zip(*recipe_test_pairs(os.path.join(out, t), t, quick))) for t in RECIPE_TASKS},
              "budgets": list(budgets), "lrs": list(recipe_plan(quick)[1]), "threads": threads}
    write_json(os.path.join(json_dir, "finetune_recipe.json"), result)
    print(recipe_report(result))
    return result


def recipe_report(result: dict) -> str:
    """The four-cell table as text: per cell each setting's chrF, then each model's default."""
    lines = []
    for cell, row in result["cells"].items():
        done = "" if cell in result["complete_cells"] else " (incomplete)"
        lines.append(f"{cell}{done} (copying the prompt: {result['copy_chrf'][cell.split(':')[0]]:.1f})")
        lines += [f"  {n:34} chrF {r['chrf']:5.1f}  val NELBO {r['val_nelbo']:.3f}" for n, r in sorted(row.items())]
    over = f"over the {len(result['complete_cells'])} complete cells of {len(result['cells'])}"
    for model, c in result["chosen"].items():
        lines.append(f"{model}: default {c['default']} {over} (worst cell {c['worst_cell']}: "
                     f"{c['worst_ratio']:.2f}x the best there)")
    for cell, v in result["e2d2_versus"].items():
        lines += [f"{cell}: E2D2 {which} ({r['setting']}) chrF {r['chrf']:.1f} = {r['to_bd3lm_default'] or 0:.2f}x "
                  f"BD3-LM's default, {r['to_best_e2d2'] or 0:.2f}x the best E2D2" for which, r in v.items()]
    return "\n".join(lines)


def finetune(stage: str, d: str, jobs: int, threads: int, quick: bool, json_dir: str, repeats: int,
             cells: tuple = ()) -> dict:
    """Run one stage of the walk-through (or all of them, in FT_STAGES order); each training
    stage skips the runs already finished. The figures go to json_dir/finetune.json (the
    task, the choices, every run on the test set), finetune_speed.json (step times, decoding
    tokens/s) and finetune_probe.json (read_the_prompt along training)."""
    if stage == "seeds":  # these two are not part of "all" (docs/claims.md)
        return ft_seeds(d, jobs, threads, quick, json_dir)
    if stage == "ar_speed":
        return ft_ar_speed(d, jobs, threads, quick, json_dir, repeats)
    if stage in ("recipe", "recipe_table"):
        return recipe(d, jobs, threads, quick, json_dir, cells, train=stage == "recipe")
    if stage != "all" and stage not in FT_STAGES:
        raise ValueError(f"--stage must be all, seeds, ar_speed, recipe, recipe_table or one of {FT_STAGES}, got {stage!r}")
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
            write_json(paths["_speed"], {**speed, "decode_tokens_per_s": ft_decode(d, ft_decode_names(state, done), quick, repeats),
                                         "threads": torch.get_num_threads()})
        elif st == "eval":  # a run already scored at the same step with the same BLEU is kept (delete the file
            scored = load(paths[""])  # to score all again); a file without "bleu" predates 13a: all scored again
            old = scored.get("runs", {}) if scored.get("bleu") == data.BLEU_NAME else {}
            keep = {n: r for n, r in old.items() if n in done and r["steps"] == ft_step(d, n)}
            runs = {**keep, **ft_eval(d, [n for n in done if n not in keep], quick)}
            write_json(paths[""], {"task": task, "state": state, "steps": FT_STEPS, "bleu": data.BLEU_NAME,
                                   "runs": dict(sorted(runs.items()))})
        elif st == "probe":
            names = [f"bd3lm-lr{state['best_lr']['bd3lm']:g}", *state["decoder_runs"].values(),
                     *(n for n in done if n.startswith("frontier-ndec"))]  # and the deeper/shallower decoders
            write_json(paths["_probe"], ft_probe(d, sorted(set(names) & set(done)), quick))  # those trained so far
    return ft_state(d, quick, load(paths["_speed"]) or None)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix (--stag) is not taken for a flag
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--stage", default="all", help=f"all (every stage of {', '.join(FT_STAGES)}, in order), one of them, "
                   "or, not part of all: seeds (the equal-time comparison at 3 seeds), ar_speed (both AR "
                   "models timed beside E2D2 and BD3-LM), recipe (the recipe protocol: train, score, tabulate), "
                   "recipe_table (score and tabulate what is finished) (default all)")
    p.add_argument("--cells", default="", help="recipe: only the runs of these cells, comma-separated task:steps "
                   f"(tasks {', '.join(RECIPE_TASKS)}; steps {', '.join(map(str, RECIPE_BUDGETS))}); "
                   "default: every cell")
    p.add_argument("--out_dir", default="out-finetune", help="where the task's files and every run go "
                   "(default out-finetune)")
    p.add_argument("--json_dir", default="bench", help="where the figures go (default bench)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time, >= 1 (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny models and a few steps (a test of the code)")
    p.add_argument("--repeats", type=int, default=None,
                   help="steptime, decode: timed rounds (median), >= 1 (default 7; --quick 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch here and in every train.py run, >= 0; 0 = torch's default "
                        "(default 0). Timings are only comparable at the same thread count; 1 on a busy or "
                        "shared machine")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        bad = [f"--{name}={value} must be {rule}" for name, value, ok, rule in [
            ("repeats", args.repeats, args.repeats is None or args.repeats >= 1, ">= 1"),
            ("jobs", args.jobs, args.jobs >= 1, ">= 1"),
            ("threads", args.threads, args.threads >= 0, ">= 0 (0 = torch's default)")] if not ok]
        cells = [c.strip() for c in args.cells.split(",") if c.strip()]
        known = [f"{t}:{b}" for b in recipe_plan(args.quick)[0] for t in RECIPE_TASKS]
        bad += [f"--cells: unknown cell {c!r}; the cells are {', '.join(known)}" for c in cells if c not in known]
        if bad:
            raise ValueError("; ".join(bad))
        if args.threads:
            torch.set_num_threads(args.threads)
        return finetune(args.stage, args.out_dir, args.jobs, args.threads, args.quick, args.json_dir,
                        args.repeats or (FT_QUICK["repeats"] if args.quick else 7), tuple(cells))
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
