"""
Train E2D2 (or a baseline) on a built-in task or on your own data.

    python train.py                          # defaults: E2D2 on 3-digit addition, GPU if any
    python train.py --task=words --n_dec=1   # any config field can be overridden
    python train.py --data=pairs.jsonl       # your seq2seq file (.jsonl or .tsv)
    python train.py --data=book.txt          # a plain text file (unconditional LM)
    python train.py --model=bd3lm            # a baseline: ar, mdlm, bd3lm
    python train.py --resume                 # continue from out_dir/ckpt.pt
    torchrun --nproc_per_node=2 train.py     # several GPUs (or CPU processes): DDP

Every field of e2d2.ModelConfig and of TrainConfig below is a flag (--name=value).
The last line printed is machine-readable:
    final step=<n> val_nelbo=<x> val_nelbo_se=<s> exact_match=<y>
val_nelbo is the held-out NELBO per target token (AR: the exact NLL) and val_nelbo_se its
standard error; for plain text there is no exact match: exact_match=nan.
"""

import argparse
import json
import math
import os
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from e2d2 import (MODEL_TYPES, ModelConfig, autocast_for, build_model, config_from_dict, eval_nelbo,
                  generate, is_cuda, pick_device)


@dataclass
class TrainConfig:
    task: str = "addition"  # built-in task (data.TASKS)
    digits: int = 0  # digits per operand (addition) / max digits (words); 0 = task default
    data: str = ""  # your data file instead of a task: .jsonl / .tsv pairs, else plain text
    data_format: str = "auto"  # "auto" (by extension), "pairs" or "text"
    val_fraction: float = 0.1  # the end of the data file held out for evaluation
    too_long: str = "skip"  # examples longer than seq_len: "skip" (and count) or "error"
    out_dir: str = "out"  # where ckpt.pt and log.jsonl go
    seed: int = 1337
    batch_size: int = 128  # the global batch: split over processes and accumulation steps
    grad_accum: int = 1  # micro-batches per process and step
    max_steps: int = 2000
    lr: float = 2e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-4  # cosine decays to this
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    train_loss: str = "masked_ce"  # "masked_ce" (as the authors train) or "nelbo"
    eval_every: int = 500  # steps between evaluations (and checkpoints)
    eval_examples: int = 256  # held-out prompts sampled for exact match
    eval_batches: int = 4  # held-out batches for the validation NELBO
    eval_draws: int = 4  # draws of (t, x_t) per held-out sequence for the NELBO estimate
    sample_steps: int = 0  # denoising steps per block when evaluating (0 = block_len)
    resume: bool = False  # continue from out_dir/ckpt.pt
    device: str = "auto"  # "auto" = cuda if available, else cpu
    compile: bool = False  # torch.compile the model (GPU)
    # --compare: train every model type with these settings and print a table
    compare: bool = False
    # --bench: time training steps of every model type at matched sizes (no data needed)
    bench: bool = False
    bench_batch: int = 8
    bench_repeats: int = 5
    out: str = ""  # --bench / --compare: also write the figures to this JSON file


# --- command line: one flag per config field ------------------------------------------


def parse_args(argv=None):
    """Build an argparse parser from the two dataclasses, so every field is a flag.
    Model fields default to None: only the ones given override the defaults (or, with
    --resume, are checked against the checkpoint's config)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def as_bool(s):
        if s.lower() in ("1", "true", "yes", "y", "on"):
            return True
        if s.lower() in ("0", "false", "no", "n", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")

    for cls, group in ((ModelConfig, "model"), (TrainConfig, "training")):
        g = p.add_argument_group(group)
        for f in fields(cls):
            kind = {int: int, float: float, str: str, bool: as_bool}[f.type]
            if kind is as_bool:  # --resume alone means --resume=true
                g.add_argument(f"--{f.name}", type=as_bool, nargs="?", const=True, default=None,
                               help=f"(default {f.default})")
            else:
                g.add_argument(f"--{f.name}", type=kind, default=None, help=f"(default {f.default})")
    args = vars(p.parse_args(argv))
    model_names = {f.name for f in fields(ModelConfig)}
    model_over = {k: v for k, v in args.items() if k in model_names and v is not None}
    train_over = {k: v for k, v in args.items() if k not in model_names and v is not None}
    return model_over, TrainConfig(**train_over)


# --- learning rate: linear warmup, then cosine decay to min_lr ------------------------


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


# --- checkpoints ----------------------------------------------------------------------


def save_checkpoint(path, model, optimizer, step, tc, metrics):
    """Write to a temporary file, then rename: a crash never leaves a half-written ckpt."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {
        "model_type": model.cfg.model,
        "config": asdict(model.cfg),
        "train_config": asdict(tc),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "metrics": metrics,
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, device: str) -> dict:
    """Read a training checkpoint, with a clear error for a missing or broken file."""
    if not os.path.exists(path):
        raise ValueError(f"--resume given but there is no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated, or not a torch file at all
        raise ValueError(f"cannot read checkpoint {path} ({e.__class__.__name__}); it is corrupt "
                         f"or not a checkpoint") from None
    missing = {"config", "model", "optimizer", "step"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of this project (missing {sorted(missing)})")
    return ckpt


# --- data -----------------------------------------------------------------------------


def load_data(tc: TrainConfig, block_len: int, seq_len: int):
    """The dataset: a built-in task, or the user's file (see data.py)."""
    tok = data.ByteTokenizer()
    if not tc.data:
        return data.TaskData(data.get_task(tc.task, tc.digits), tok)
    if data_format(tc) == "pairs":
        return data.PairsData(tc.data, tok, block_len, seq_len, tc.val_fraction, tc.too_long)
    return data.TextData(tc.data, seq_len, tc.val_fraction)


def data_format(tc: TrainConfig) -> str:
    return "pairs" if data.data_kind(tc.data, tc.data_format) == "seq2seq" else "text"


def default_seq_len(tc: TrainConfig, block_len: int) -> int:
    """A seq_len that fits every example of the task or file (text: 128-byte windows)."""
    if not tc.data:
        max_p, max_a = data.get_task(tc.task, tc.digits).max_lengths()
        return data.example_length(max_p, max_a, block_len)
    if data_format(tc) == "text":
        return data.ceil_to(128, block_len)
    tok = data.ByteTokenizer()
    return max(data.example_length(len(tok.encode(p)), len(tok.encode(a)), block_len)
               for p, a in data.read_pairs(tc.data))


# --- evaluation -----------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, dataset, tc, device, autocast):
    """Validation NELBO per token with its standard error (fixed held-out batches, fixed
    noise; the exact estimate of e2d2.eval_nelbo, over all of t in [0, 1] whatever
    [t_min, t_max] training used); for plain text also per byte, bits per byte and the
    perplexity bound. For seq2seq data, the exact-match accuracy of answers sampled for
    held-out prompts."""
    cfg = model.cfg
    model.eval()
    g = torch.Generator(device=device).manual_seed(tc.seed)  # same noise at every eval
    val = dataset.val_examples(tc.eval_batches * tc.batch_size, tc.seed)
    batches = [dataset.collate(val[i:i + tc.batch_size], cfg.block_len, cfg.seq_len).to(device)
               for i in range(0, len(val), tc.batch_size)]
    text = dataset.kind == "text"
    with autocast:
        est = eval_nelbo(model, [(b.x0, b.prompt_mask) for b in batches], tc.eval_draws, g,
                         data.ByteTokenizer().bytes_per_token() if text else None)
    fig = est.figures()
    metrics = {"val_nelbo": fig["nelbo_per_token"], "val_nelbo_se": fig["nelbo_per_token_se"],
               "exact_match": float("nan")}
    if text:
        metrics.update({"val_" + k: v for k, v in fig.items() if not k.startswith("nelbo_per_token")})
    if dataset.kind == "seq2seq":
        examples = dataset.val_examples(tc.eval_examples, tc.seed + 10_000)
        correct, new_tokens, seconds = 0, 0, 0.0
        for i in range(0, len(examples), tc.batch_size):
            chunk = examples[i:i + tc.batch_size]
            with autocast:
                res = generate(model, [p for p, _ in chunk], steps=tc.sample_steps or None)
            correct += sum(ids == a for ids, (_, a) in zip(res.tokens, chunk))
            new_tokens, seconds = new_tokens + res.new_tokens, seconds + res.seconds
        metrics.update(exact_match=correct / len(examples),
                       sample_tokens_per_s=new_tokens / max(seconds, 1e-9))
    model.train()
    return metrics


# --- setup ----------------------------------------------------------------------------


def setup(tc: TrainConfig, model_over: dict, device: str):
    """The model config, the checkpoint (with --resume) and the dataset. Raises
    ValueError with a clear message for anything the user can fix."""
    if tc.resume:
        ckpt = load_checkpoint(os.path.join(tc.out_dir, "ckpt.pt"), device)
        cfg = config_from_dict(ckpt["config"], data.prompt_attention_of(ckpt.get("train_config", {})))
        if "model" in model_over and model_over["model"] != cfg.model:
            raise ValueError(f"the checkpoint in {tc.out_dir} holds a {cfg.model!r} model, not "
                             f"{model_over['model']!r}")
        clash = {k: (v, getattr(cfg, k)) for k, v in model_over.items() if getattr(cfg, k) != v}
        if clash:
            raise ValueError("--resume keeps the checkpoint's model config; these flags differ "
                             "from it (given, saved): " + str(clash))
    else:
        ckpt = None
        # defaults, then the tokenizer's ids, a seq_len that fits the data and how its
        # prompts are read (seq2seq: bidirectionally; text: block-causally), then the flags
        tok = data.ByteTokenizer()
        block_len = model_over.get("block_len", ModelConfig.block_len)
        kind = data.data_kind(tc.data, tc.data_format) if tc.data else "seq2seq"
        prompt_attention = data.PROMPT_ATTENTION[kind]
        if model_over.get("prompt_attention", prompt_attention) != prompt_attention:
            raise ValueError(f"prompt_attention is set by the data: {kind} data trains prompts "
                             f"{prompt_attention!r}, not {model_over['prompt_attention']!r}; drop the flag")
        base = dict(vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id,
                    mask_id=tok.mask_id, seq_len=default_seq_len(tc, block_len),
                    prompt_attention=prompt_attention)
        cfg = ModelConfig(**{**base, **model_over})
    dataset = load_data(tc, cfg.block_len, cfg.seq_len)
    if getattr(dataset, "skipped", 0):
        print(f"skipped {dataset.skipped} examples of {tc.data} longer than seq_len={cfg.seq_len}")
    n_micro = tc.grad_accum * (dist.get_world_size() if dist.is_initialized() else 1)
    if tc.grad_accum < 1 or tc.batch_size % n_micro != 0:
        raise ValueError(f"batch_size={tc.batch_size} must split evenly into {n_micro} micro-batches "
                         f"(processes x grad_accum)")
    return cfg, ckpt, dataset


# --- the training loop ----------------------------------------------------------------


def train(cfg: ModelConfig, tc: TrainConfig, device: str, ckpt=None, dataset=None,
          stop: "StopRequest | None" = None) -> dict:
    """Train; return the final step, the last evaluation, the loss curve and the model.
    Under torchrun every process runs this; rank 0 alone evaluates, logs and saves.
    stop: main() passes the StopRequest that its signal handlers set (a first Ctrl-C or
    SIGTERM ends the run after the current step, saved); a caller that imports train()
    (tests, notebooks) keeps its own signal handling and passes nothing."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    main_process = rank == 0
    if dataset is None:
        dataset = load_data(tc, cfg.block_len, cfg.seq_len)
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    log_path = os.path.join(tc.out_dir, "log.jsonl")

    torch.manual_seed(tc.seed)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95),
                                  weight_decay=tc.weight_decay)
    step, metrics = 0, {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, metrics = ckpt["step"], ckpt.get("metrics", {})
        if main_process:
            print(f"resumed from {ckpt_path} at step {step}")
    if main_process:
        os.makedirs(tc.out_dir, exist_ok=True)
        keep_log_until(log_path, step)  # a resumed run rewrites what came after its checkpoint
    autocast = autocast_for(device)  # bf16 autocast on GPU; plain float32 on CPU
    fwd = torch.compile(model) if tc.compile else model
    if world > 1:  # gradients are averaged over the processes during backward
        fwd = DDP(fwd, device_ids=[torch.device(device).index] if is_cuda(device) else None,
                  find_unused_parameters=cfg.model == "e2d2" and cfg.decoder == "shared_kv")
    if main_process:
        layers = f"N_enc={cfg.n_enc}, N_dec={cfg.n_dec}" if cfg.model == "e2d2" else f"N={cfg.n_enc}"
        source = tc.data or f"task={tc.task}"
        print(f"{cfg.model}: {model.num_params() / 1e6:.2f}M parameters, {layers}, block_len={cfg.block_len}, "
              f"seq_len={cfg.seq_len}, {source}, device={device}, processes={world}")

    noise = torch.Generator(device=device)
    stop = stop or StopRequest(install=False)  # never requested unless main() installed it
    losses, train_tokens, train_seconds = [], 0, 0.0
    micro = tc.batch_size // (world * tc.grad_accum)  # examples per micro-batch
    model.train()
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0,
               **({} if main_process else {"disable": True}))  # (TQDM_DISABLE=1 hides it too)
    t_last, tokens_since = time.perf_counter(), 0
    while step < tc.max_steps:
        t_step = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        torch.manual_seed(tc.seed * 7919 + step)  # dropout of a step is fixed too
        # 1. the global batch is a pure function of (seed, step); it is cut into
        #    world * grad_accum micro-batches and this process takes grad_accum of them
        examples = dataset.train_examples(tc.batch_size, tc.seed, step)
        step_loss, step_tokens = 0.0, 0
        for a in range(tc.grad_accum):
            j = rank * tc.grad_accum + a  # global index of the micro-batch
            batch = dataset.collate(examples[j * micro:(j + 1) * micro], cfg.block_len, cfg.seq_len).to(device)
            noise.manual_seed(tc.seed * 7919 + step * 1009 + j)  # its noise depends on j, not on world
            # 2. forward (noise x0 -> x_t, encode x0, decode x_t, loss) and backward; the
            #    gradient is the mean over micro-batches (DDP averages over processes)
            sync = a == tc.grad_accum - 1 or world == 1
            with (nullcontext() if sync else fwd.no_sync()), autocast:
                out = fwd(batch.x0, batch.prompt_mask, generator=noise, train_loss=tc.train_loss)
            (out.loss / tc.grad_accum).backward()
            step_loss += out.loss.detach().float() / (tc.grad_accum * world)
            step_tokens += batch.x0.numel()
        if world > 1:  # the loss of the global batch, the same number on every process
            dist.all_reduce(step_loss)
        if not math.isfinite(step_loss.item()):
            bar.close()
            kept = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written yet"
            raise FloatingPointError(f"the loss became {step_loss.item()} at step {step + 1}: stopping "
                                     f"before the update ({kept}). Try a lower --lr.")
        # 3. the update
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss.item())
        train_seconds += time.perf_counter() - t_step
        train_tokens += step_tokens * world
        # 4. progress bar, log, evaluation, checkpoint (rank 0)
        if main_process:
            bar.update(1)
            tokens_since += step_tokens * world
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": losses[-1], "lr": lr_at(step - 1, tc)}) + "\n")
            if step % 10 == 0:
                now = time.perf_counter()
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_since / (now - t_last):.0f}")
                t_last, tokens_since = now, 0
            if step % tc.eval_every == 0 or step == tc.max_steps:
                metrics = evaluate(model, dataset, tc, device, autocast)
                bar.write(f"step {step}: {format_metrics(metrics)}")
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
                save_checkpoint(ckpt_path, model, optimizer, step, tc, metrics)
        if stop.agreed(device):
            bar.close()
            if main_process:
                save_checkpoint(ckpt_path, model, optimizer, step, tc, metrics)
                print(f"stopped: saved step {step} to {ckpt_path}; continue with --resume")
            return {"step": step, "metrics": metrics, "losses": losses, "model": model, "stopped": True}
    bar.close()
    if main_process and not metrics:  # nothing trained in this run, no metrics in the checkpoint
        metrics = evaluate(model, dataset, tc, device, autocast)
    return {"step": step, "metrics": metrics, "losses": losses, "model": model, "stopped": False,
            "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9)}


def format_metrics(m: dict) -> str:
    """One evaluation line: every NELBO figure with its standard error."""
    s = f"val_nelbo={m['val_nelbo']:.4f} ± {m['val_nelbo_se']:.4f} nats/token"
    if "val_nelbo_per_byte" in m:
        s += (f", {m['val_nelbo_per_byte']:.4f} ± {m['val_nelbo_per_byte_se']:.4f} nats/byte, "
              f"{m['val_bits_per_byte']:.4f} ± {m['val_bits_per_byte_se']:.4f} bits/byte, "
              f"perplexity <= {m['val_ppl_bound']:.3f} ± {m['val_ppl_bound_se']:.3f}")
    return s + f" exact_match={m['exact_match']:.3f}"


def keep_log_until(path: str, step: int) -> None:
    """Drop the log lines of steps after `step` (left by a run that was killed)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


class StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step,
    so the checkpoint is always taken between two whole steps; a second one stops at once.
    Under torchrun the processes agree on stopping (one asked = all stop). Only main()
    installs the handlers (install=True): a process that imports train() keeps its own."""

    def __init__(self, install: bool = True):
        self.requested = False
        self.previous = {}
        if install:
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving after this step (again to abort)", file=sys.stderr)

    def agreed(self, device) -> bool:
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0


# --- main -----------------------------------------------------------------------------


def main(argv=None):
    model_over, tc = parse_args(argv)
    try:
        # torchrun sets LOCAL_RANK: each process then uses the GPU of its local rank
        local_rank = int(os.environ["LOCAL_RANK"]) if "RANK" in os.environ else None
        device = pick_device(tc.device, local_rank)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if "RANK" in os.environ:  # started by torchrun: one process per device
        start_distributed(device)
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    stop = StopRequest()  # Ctrl-C / SIGTERM: finish the step, save, exit
    try:
        if tc.bench:
            return bench_training(tc, model_over, device)
        if tc.compare:
            return compare(tc, model_over, device, stop)
        cfg, ckpt, dataset = setup(tc, model_over, device)
        result = train(cfg, tc, device, ckpt, dataset, stop)
    except (ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    finally:
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()
    if result["stopped"]:
        sys.exit(130)
    if main_process:
        m = result["metrics"]
        print(f"final step={result['step']} val_nelbo={m['val_nelbo']:.4f} "
              f"val_nelbo_se={m['val_nelbo_se']:.4f} exact_match={m['exact_match']:.4f}")


def start_distributed(device: str) -> None:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK: NCCL on this process's GPU (device
    is already cuda:<LOCAL_RANK>, see e2d2.pick_device), or gloo on the CPU."""
    if is_cuda(device):
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


# --- --compare: every model, the same budget -------------------------------------------


def compare(tc: TrainConfig, model_over: dict, device: str, stop=None):
    """Train E2D2 and the three baselines with the same settings (baselines: N = n_enc
    layers) and print a markdown table of the held-out results."""
    if "model" in model_over:
        raise ValueError("--compare trains every model type; drop --model")
    rows = []
    for name in MODEL_TYPES:
        run = replace(tc, out_dir=os.path.join(tc.out_dir, name), compare=False)
        cfg, _, dataset = setup(run, {**model_over, "model": name}, device)
        print(f"\n=== {name} ===")
        r = train(cfg, run, device, None, dataset, stop)
        if r["stopped"]:
            return rows
        rows.append({"model": name, "layers": cfg.n_enc + (cfg.n_dec if name == "e2d2" else 0),
                     "params": r["model"].num_params(), **r["metrics"],
                     "train_tokens_per_s": r["train_tokens_per_s"]})
    print(f"\n{tc.task}, {tc.max_steps} steps of batch {tc.batch_size}, device={device}")
    print("| model | layers | params | exact match | val NELBO ± SE, nats/token (AR: NLL) | sampling tokens/s "
          "| training tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.2f}M | {r['exact_match']:.3f} | "
              f"{r['val_nelbo']:.4f} ± {r['val_nelbo_se']:.4f} | {r['sample_tokens_per_s']:.0f} | "
              f"{r['train_tokens_per_s']:.0f} |")
    if tc.out:
        write_json(tc.out, {"device": device, "train_config": asdict(tc), "rows": rows})


# --- --bench: training step speed, side by side ----------------------------------------

# The benchmark sizes: prompt 16 + answer 128 tokens, width 256, N_enc=12, N_dec=2, B=8
BENCH_MODEL = dict(d_model=256, n_heads=4, n_enc=12, n_dec=2, block_len=8, seq_len=16 + 128)
BENCH_PROMPT = 16


def training_cost(cfg: ModelConfig) -> int:
    """Analytic cost of one training forward, in layer passes per data token: E2D2 runs
    N_enc layers over x_0 and N_dec over x_t; BD3-LM its N layers over [x_0 ; x_t] (2L
    tokens); MDLM and AR N layers over L. (Attention and the backward pass are left out.)"""
    return {"e2d2": cfg.n_enc + cfg.n_dec, "bd3lm": 2 * cfg.n_enc}.get(cfg.model, cfg.n_enc)


def bench_training(tc: TrainConfig, model_over: dict, device: str):
    """Time forward + backward + optimizer steps of every model type on random tokens at
    matched sizes (E2D2: N_enc + N_dec layers; the baselines: N = N_enc). After 2 warm-up
    steps, the median of `bench_repeats` steps. Prints tokens/s, memory and the speed
    ratio to E2D2 beside the analytic one."""
    autocast = autocast_for(device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in MODEL_TYPES:
        cfg = ModelConfig(**{**BENCH_MODEL, **model_over, "model": name})
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        L = cfg.seq_len
        x0 = torch.randint(0, 256, (tc.bench_batch, L), generator=g).to(device)
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
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in tqdm(range(tc.bench_repeats), desc=f"bench {name}", leave=False):
            t0 = time.perf_counter()
            step()
            if is_cuda(device):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        row = {"model": name, "layers": cfg.n_enc + (cfg.n_dec if name == "e2d2" else 0),
               "params": model.num_params(), "step_s": step_s,
               "tokens_per_s": tc.bench_batch * L / step_s,
               "activation_mib": saved_activation_bytes(model, x0, prompt_mask, autocast) / 2**20,
               "cost": training_cost(cfg)}
        if is_cuda(device):
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)
    e2d2_row = rows[0]
    for r in rows:
        r["ratio_e2d2_over_model"] = e2d2_row["tokens_per_s"] / r["tokens_per_s"]
        r["analytic_ratio"] = r["cost"] / e2d2_row["cost"]
    cfg0 = ModelConfig(**{**BENCH_MODEL, **model_over})
    print(f"training step, batch {tc.bench_batch} x {cfg0.seq_len} tokens (prompt {BENCH_PROMPT}), "
          f"width {cfg0.d_model}, N_enc={cfg0.n_enc}, N_dec={cfg0.n_dec}, B={cfg0.block_len}, "
          f"device={device}, median of {tc.bench_repeats}")
    mem = "peak MiB" if is_cuda(device) else "activations MiB"
    print(f"{'model':8} {'layers':>6} {'tokens/s':>10} {'step ms':>9} {mem:>16} {'E2D2 speed-up':>14} {'analytic':>9}")
    for r in rows:
        m = r.get("peak_mib", r["activation_mib"])
        print(f"{r['model']:8} {r['layers']:>6} {r['tokens_per_s']:>10.0f} {r['step_s'] * 1e3:>9.1f} "
              f"{m:>16.1f} {r['ratio_e2d2_over_model']:>13.2f}x {r['analytic_ratio']:>8.2f}x")
    print("E2D2 speed-up = E2D2 tokens/s / model tokens/s; analytic = layer passes per token of the "
          "model / of E2D2 (linear layers only)")
    if tc.out:
        write_json(tc.out, {"device": device, "batch": tc.bench_batch, "config": asdict(cfg0), "rows": rows})
    return rows


def saved_activation_bytes(model, x0, prompt_mask, autocast) -> int:
    """Bytes of the tensors autograd keeps for the backward pass during one forward: the
    activation memory of a training step, measured the same way on CPU and GPU."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x0, prompt_mask, generator=torch.Generator(device=x0.device).manual_seed(0)).loss
    return total


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
