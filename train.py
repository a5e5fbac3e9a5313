"""
Train E2D2 (or a baseline) on a built-in task or on your own data.

    python train.py                          # defaults: E2D2 on 3-digit addition, GPU if any
    python train.py --task=words --n_dec=1   # any config field can be overridden
    python train.py --data=pairs.jsonl       # your seq2seq file (.jsonl, .tsv or .csv)
    python train.py --data=book.txt          # a plain text file (unconditional LM)
    python train.py --model=bd3lm            # a baseline: ar, mdlm, bd3lm
    python train.py --data=book.txt --tokenizer=bpe --bpe_vocab=1024   # a BPE tokenizer, learned here
    python train.py --data=book.txt --init_from=out_ar/ckpt.pt         # E2D2 from an AR model (the paper's recipe)
    python train.py --resume                 # continue from out_dir/ckpt.pt
    torchrun --nproc_per_node=2 train.py     # several GPUs (or CPU processes): DDP

Every field of e2d2.ModelConfig and of TrainConfig below is a flag (--name=value).
The last line printed is machine-readable:
    final step=<n> val_nelbo=<x> val_nelbo_se=<s> exact_match=<y>
val_nelbo is the held-out NELBO per target token (AR: the exact NLL) and val_nelbo_se its
standard error; for plain text there is no exact match: exact_match=nan.
Speed and side-by-side comparisons of the models are in bench.py.
"""

import argparse
import gc
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data

# --impl=FILE (or $E2D2_IMPL): your copy of e2d2.py (python exercises.py start N) stands in
# for e2d2.py in this whole run (models.py and baselines.py too): loaded before the imports
# below read e2d2, which is why it is looked for in sys.argv here and not by argparse.
if __name__ == "__main__" and data.impl_path(sys.argv[1:]):
    try:
        data.use_impl(data.impl_path(sys.argv[1:]))
    except ValueError as e:
        sys.exit(f"error: {e}")

from e2d2 import (DECODER_LAYERS, DECODER_VARIANTS, PROMPT_ATTENTION, SCHEDULES, TRAIN_LOSSES, LossOptions,
                  ModelConfig, generate)
from models import (DTYPES, E2D2_INIT_FIELDS, MODEL_TYPES, autocast_for, build_model, config_from_dict, eval_nelbo,
                    init_from_checkpoint, init_source_error, is_cuda, load_checkpoint, model_spec, peak_bf16_tflops,
                    pick_device, train_flops_per_token, upgrade_optimizer_state, upgrade_state_dict, weights_checksum)

# -----------------------------------------------------------------------------
# Training settings. The model's settings are e2d2.ModelConfig; both are flags.


@dataclass
class TrainConfig:
    # data: a built-in task, or a file of your own (data.load_dataset reads it)
    task: str = "addition"  # built-in task (data.TASKS)
    digits: int = 0  # digits per operand (addition) / max digits (words); 0 = task default
    data: str = ""  # your data file instead of a task: .jsonl / .tsv / .csv pairs, else plain text
    data_format: str = "auto"  # "auto" (a pairs file by its extension, data.PAIR_FORMATS, else text), "pairs", "text"
    val_fraction: float = 0.1  # the share at the end of the data file held out, in (0, 1)
    too_long: str = "skip"  # examples longer than seq_len: "skip" (and count) or "error"
    tokenizer: str = "bytes"  # "bytes" (needs nothing) or "bpe" (trained on the data file; pip install tokenizers)
    bpe_vocab: int = 1024  # --tokenizer=bpe: vocabulary size, the 4 special tokens included
    init_from: str = ""  # start from a checkpoint: an AR one (any model) or one of the same kind; see INIT_RECIPE
    # where checkpoints and the log go
    out_dir: str = "out"  # ckpt.pt (last), best.pt (lowest val NELBO), log.jsonl, config.json
    resume: bool = False  # continue from out_dir/ckpt.pt with the training config saved there
    overwrite: bool = False  # a new run may replace the checkpoint and log already in out_dir
    save_every: int = 0  # steps between checkpoints besides those at evaluations (>= 0; 0 = none)
    keep_evals: bool = False  # also keep each evaluation's checkpoint as ckpt_<step>.pt (to study training)
    seed: int = 1337  # every step is a pure function of (seed, step): data, noise, dropout
    # optimisation: AdamW, linear warmup then cosine decay, gradient clipping
    batch_size: int = 128  # the global batch (>= 1): split over processes and accumulation steps
    grad_accum: int = 1  # micro-batches per process and step (>= 1)
    max_steps: int = 2000  # optimizer steps in all (>= 1)
    lr: float = 2e-3  # peak learning rate (> 0)
    min_lr: float = 1e-4  # cosine decays to this, in [0, lr]
    warmup_steps: int = 100  # linear warmup to lr (>= 0)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (>= 0)
    grad_clip: float = 1.0  # clip the gradient norm to this (> 0)
    train_loss: str = "masked_ce"  # "masked_ce" (as the authors train) or "nelbo"
    # evaluation (every eval_every steps, then a checkpoint)
    eval_every: int = 500  # steps between evaluations, each followed by a checkpoint (>= 1)
    eval_examples: int = 256  # held-out prompts sampled for exact match (>= 1)
    eval_batches: int = 4  # held-out batches for the validation NELBO (>= 1)
    eval_draws: int = 4  # draws of (t, x_t) per held-out sequence for the NELBO estimate (>= 1)
    sample_steps: int = 0  # denoising steps per block when evaluating (>= 0; 0 = block_len)
    # system
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"
    dtype: str = "auto"  # precision: "auto" (bf16 autocast on CUDA, float32 on the CPU), "float32" or "bfloat16"
    compile: bool = False  # torch.compile the model (GPU)
    peak_tflops: float = 0.0  # the device's dense bf16 peak, TFLOP/s, for MFU (>= 0; 0 = NVIDIA's figure, known GPUs)
    threads: int = 0  # CPU threads for torch (>= 0; 0 = torch's default; 1 on a busy or shared machine)


# Flags that may differ from the checkpoint's training config on --resume: how long to go on,
# how often to evaluate and save, and where/how to run. Everything else (the data, the seed,
# the optimiser, the batch) is restored, so a resumed run keeps training the same thing.
MAY_CHANGE_ON_RESUME = ("resume", "out_dir", "max_steps", "eval_every", "save_every", "keep_evals", "eval_examples",
                        "eval_batches", "eval_draws", "sample_steps", "device", "dtype", "compile", "threads",
                        "peak_tflops")

# The fine-tuning recipe: a run started from an AR checkpoint (--init_from, without --resume)
# takes these values for the flags it leaves out, per model kind. E2D2's decoder is the one the
# paper fine-tunes with (e2d2.py, section 1, names the paper's two decoders): shared-KV, made
# of the TOP half of the AR's N layers (N_dec = N / 2, rounded up), tied to them (no new
# parameters). A run from scratch keeps ModelConfig's default, the paper's from-scratch
# decoder ("hidden", untied). Measured on the vowels task (docs/finetuning.md, finetune.py,
# 300 steps from an AR with N = 8): lr 3e-3 beat 1e-3 and 3e-4 for E2D2 (val NELBO
# 1.68 vs 2.00, 2.53), and 3e-3 beat 1e-3 for BD3-LM (1.13 vs 1.38); no other decoder (hidden,
# untied, bottom layers) beat the tied shared-KV one by more than its noise; N_dec = N / 2 beat
# N_dec = 2 (blocks of 4: 1.23 vs 1.73, chrF 24.7 vs 18.0; blocks of 8: 1.54 vs 1.68) and
# N_dec = 1 learned nothing but the letter frequencies. With N_dec = N / 2 and trained for as
# long as BD3-LM's 300 steps take, E2D2 was ahead of BD3-LM (blocks of 4: chrF 38.5 vs 30.8).
# N_dec = N / 2 decodes slower than N_dec = 2: the price is on the frontier of docs/finetuning.md. AR: 3e-3 beat 1e-3 (val NLL
# 0.36 vs 0.81). MDLM: the one rate tried.
INIT_RECIPE = {
    "e2d2": {"decoder": "shared_kv", "tie_decoder": True, "decoder_layers": "top", "n_dec": "N/2", "lr": 3e-3},
    "bd3lm": {"lr": 3e-3}, "mdlm": {"lr": 3e-3}, "ar": {"lr": 3e-3},
}


def with_init_recipe(model_over: dict, train_over: dict):
    """The flags of a run that starts from an AR checkpoint: those given, then INIT_RECIPE's
    for the rest. Returns (model_over, train_over, the recipe's flags that were used)."""
    if not train_over.get("init_from") or train_over.get("resume"):
        return model_over, train_over, {}
    src = config_from_dict(load_checkpoint(train_over["init_from"], "cpu")["config"])
    if src.model != "ar":  # a model of its own kind keeps its own settings (see setup)
        return model_over, train_over, {}
    recipe = dict(INIT_RECIPE.get(model_over.get("model", ModelConfig.model), {}))
    if recipe.get("n_dec") == "N/2":  # half of the AR's layers, rounded up (N = 3: 2; N = 1: 1)
        recipe["n_dec"] = (src.n_enc + 1) // 2
    used = {k: v for k, v in recipe.items() if k not in model_over and k not in train_over}
    model_names = {f.name for f in fields(ModelConfig)}
    return ({**model_over, **{k: v for k, v in used.items() if k in model_names}},
            {**train_over, **{k: v for k, v in used.items() if k not in model_names}}, used)


# Allowed values of the string flags (argparse lists them in --help and refuses others).
# Each list is defined once, where the values are used; this only collects them.
CHOICES = {"model": MODEL_TYPES, "decoder": DECODER_VARIANTS, "decoder_layers": DECODER_LAYERS,
           "schedule": tuple(SCHEDULES),
           "prompt_attention": PROMPT_ATTENTION, "task": tuple(data.TASKS), "data_format": data.DATA_FORMATS,
           "too_long": data.TOO_LONG, "train_loss": TRAIN_LOSSES, "tokenizer": data.TOKENIZERS, "dtype": DTYPES}


# -----------------------------------------------------------------------------
# Command line: one flag per field of both dataclasses.


def field_help(cls) -> dict:
    """One line of --help per dataclass field, from the comment on that field's line in the
    source (the comments above are the documentation; --help shows the same words)."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): \w+ = .*?#\s*(?:\[E2D2\]\s*)?(.*)$", line)  # (an [E2D2] mark is not help)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser built from the two dataclasses, so every field is a flag, with
    its comment, allowed values and default in --help. Every flag defaults to None, so
    that parse_args can tell the flags given from those left out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --max_step is an error, not --max_steps

    def as_bool(s):
        if s.lower() in ("1", "true", "yes", "y", "on"):
            return True
        if s.lower() in ("0", "false", "no", "n", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")

    for cls, group in ((ModelConfig, "model"), (TrainConfig, "training")):
        g = p.add_argument_group(group)
        helps = field_help(cls)
        for f in fields(cls):
            default = f"default {f.default}"
            if f.name == "seq_len":  # derived from the data unless given
                default = "default: the longest example of the data (16 for the default task, 128 for text)"
            text = f"{helps.get(f.name, '')} ({default})".replace("%", "%%")
            kind = {int: int, float: float, str: str, bool: as_bool}[f.type]
            if f.name == "resume":  # which flags --resume lets change (the rest is restored)
                text += ". Only these may differ from the checkpoint: " + ", ".join(
                    "--" + n for n in MAY_CHANGE_ON_RESUME if n != "resume")
            if kind is as_bool:  # --resume alone means --resume=true
                g.add_argument(f"--{f.name}", type=as_bool, nargs="?", const=True, default=None, help=text)
            else:
                g.add_argument(f"--{f.name}", type=kind, default=None, help=text, choices=CHOICES.get(f.name))
    p.add_argument("--impl", default=None, metavar="FILE", help="train and sample with FILE, your copy of "
                   "e2d2.py (exercises.py), in place of e2d2.py; read before anything else (default: e2d2.py)")
    return p


def parse_args(argv=None):
    """The model fields given (model_over: only they override the defaults, or with
    --resume are checked against the checkpoint's config) and the training fields given
    (train_over), both as dicts."""
    args = vars(build_parser().parse_args(argv))
    impl = args.pop("impl")  # already loaded at the top when this is the command line
    if impl is not None and sys.modules["e2d2"].__file__ != os.path.abspath(impl):
        raise SystemExit(f"error: --impl={impl} works on the command line only (python train.py --impl=...)")
    # split the flags given (not None) into model overrides and training flags
    model_names = {f.name for f in fields(ModelConfig)}
    model_over = {k: v for k, v in args.items() if k in model_names and v is not None}
    train_over = {k: v for k, v in args.items() if k not in model_names and v is not None}
    return model_over, train_over


def training_config(train_over: dict) -> TrainConfig:
    """The TrainConfig of this run: the defaults and the flags given; with --resume, the
    training config saved in the checkpoint instead of the defaults (so --resume alone
    continues on the same data, seed and batch). A flag given again with another value is
    an error naming both, unless it is one of MAY_CHANGE_ON_RESUME."""
    if not train_over.get("resume"):
        return TrainConfig(**train_over)
    out_dir = train_over.get("out_dir", TrainConfig.out_dir)
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), "cpu")
    known = {f.name for f in fields(TrainConfig)}
    # a flag the checkpoint predates was its default then: that is the value it trained with
    saved = {**asdict(TrainConfig()), **{k: v for k, v in (ckpt.get("train_config") or {}).items() if k in known}}
    clash = [f"--{k}={v!r} (the checkpoint has {saved[k]!r})" for k, v in train_over.items()
             if saved[k] != v and k not in MAY_CHANGE_ON_RESUME]
    if clash:
        raise ValueError("--resume continues the checkpoint's training config; these flags differ "
                         "from it: " + ", ".join(clash) + ". Only these may change on resume: "
                         + ", ".join(MAY_CHANGE_ON_RESUME))
    return TrainConfig(**{**saved, **train_over})


def validate_train_config(tc: TrainConfig) -> None:
    """Refuse, before the first step, settings that would crash later or train wrongly in
    silence (a negative clip ascends the gradient, max_steps=0 trains nothing, ...)."""
    rules = [("batch_size", tc.batch_size >= 1, ">= 1"), ("grad_accum", tc.grad_accum >= 1, ">= 1"),
             ("max_steps", tc.max_steps >= 1, ">= 1"), ("eval_every", tc.eval_every >= 1, ">= 1"),
             ("save_every", tc.save_every >= 0, ">= 0 (0 = only at evaluations)"),
             ("grad_clip", tc.grad_clip > 0, "> 0 (a gradient-norm bound)"),
             ("lr", tc.lr > 0, "> 0"), ("min_lr", 0 <= tc.min_lr <= tc.lr, "in [0, lr]"),
             ("warmup_steps", tc.warmup_steps >= 0, ">= 0"), ("weight_decay", tc.weight_decay >= 0, ">= 0"),
             ("val_fraction", 0 < tc.val_fraction < 1, "in (0, 1): the share of the data file held out"),
             ("eval_examples", tc.eval_examples >= 1, ">= 1"), ("eval_batches", tc.eval_batches >= 1, ">= 1"),
             ("eval_draws", tc.eval_draws >= 1, ">= 1"), ("sample_steps", tc.sample_steps >= 0, ">= 0"),
             ("threads", tc.threads >= 0, ">= 0 (0 = torch's default)"),
             ("peak_tflops", tc.peak_tflops >= 0, ">= 0 (0 = the figure of a known GPU)"),
             ("bpe_vocab", tc.bpe_vocab >= 260, ">= 260 (256 bytes + 4 special tokens)")]
    bad = [f"--{name}={getattr(tc, name)} must be {rule}" for name, ok, rule in rules if not ok]
    if bad:
        raise ValueError("; ".join(bad))


def check_out_dir(tc: TrainConfig) -> None:
    """A new run never silently replaces an earlier run's checkpoint and log, and a folder
    that cannot be written to is a clear error before any training is spent."""
    if os.path.exists(tc.out_dir) and not os.path.isdir(tc.out_dir):
        raise ValueError(f"--out_dir={tc.out_dir} is a file, not a folder")
    if not tc.resume and os.path.exists(os.path.join(tc.out_dir, "ckpt.pt")) and not tc.overwrite:
        raise ValueError(f"{tc.out_dir} already holds a checkpoint (ckpt.pt) of an earlier run: continue "
                         f"it with --resume, or start over and replace it with --overwrite")
    try:
        os.makedirs(tc.out_dir, exist_ok=True)
        probe = os.path.join(tc.out_dir, f".write_test.{os.getpid()}")  # one per process
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write to --out_dir={tc.out_dir}: {e.strerror}") from None


# -----------------------------------------------------------------------------
# Setup: the model config, the checkpoint to resume from, the dataset.


def setup(tc: TrainConfig, model_over: dict, device: str):
    """The model config, the checkpoint (with --resume) and the dataset. Raises
    ValueError with a clear message for anything the user can fix."""
    validate_train_config(tc)
    check_out_dir(tc)  # every process: each must stop here if the folder is refused
    if tc.resume:
        # the checkpoint's config is the model; flags may only repeat it
        ckpt = load_checkpoint(os.path.join(tc.out_dir, "ckpt.pt"), device,
                               need=("config", "model", "optimizer", "step"))
        cfg = config_from_dict(ckpt["config"], data.prompt_attention_of(ckpt.get("train_config", {})))
        if "model" in model_over and model_over["model"] != cfg.model:
            raise ValueError(f"the checkpoint in {tc.out_dir} holds a {cfg.model!r} model, not "
                             f"{model_over['model']!r}")
        clash = {k: (v, getattr(cfg, k)) for k, v in model_over.items() if getattr(cfg, k) != v}
        if clash:
            raise ValueError("--resume keeps the checkpoint's model config; these flags differ "
                             "from it (given, saved): " + str(clash))
        dataset, _ = data.load_dataset(asdict(tc), cfg.block_len, cfg.seq_len,
                                       data.tokenizer_from_dict(ckpt.get("tokenizer")))  # the saved one
    else:
        ckpt = None
        # a new model: the defaults, then the tokenizer's special ids, a seq_len that fits
        # the data (the dataset decides it unless --seq_len does) and how its prompts are
        # read (seq2seq: bidirectionally; text: block-causally), then the flags
        tok, arch = None, {}
        if tc.init_from:  # start from a trained model: its tokenizer, its width and depth by default
            src_ckpt = load_checkpoint(tc.init_from, "cpu")
            src, target = config_from_dict(src_ckpt["config"]), model_over.get("model", ModelConfig.model)
            error = init_source_error(src.model, target)
            if error:
                raise ValueError(error)
            tok = data.tokenizer_from_dict(src_ckpt.get("tokenizer"))
            if tok.to_dict()["kind"] != tc.tokenizer:
                raise ValueError(f"--init_from={tc.init_from} was trained with --tokenizer="
                                 f"{tok.to_dict()['kind']}, not --tokenizer={tc.tokenizer}")
            # a model of its own kind also keeps its blocks, and an E2D2 its decoder
            inherit = ("d_model", "n_heads", "n_enc", "rope_base") + (("block_len",) if src.model == target else ())
            arch = {k: getattr(src, k) for k in inherit + (E2D2_INIT_FIELDS if src.model == target == "e2d2" else ())}
        block_len = model_over.get("block_len", arch.get("block_len", ModelConfig.block_len))
        dataset, seq_len = data.load_dataset(asdict(tc), block_len, model_over.get("seq_len"), tok)
        prompt_attention = data.PROMPT_ATTENTION[dataset.kind]
        if model_over.get("prompt_attention", prompt_attention) != prompt_attention:
            raise ValueError(f"prompt_attention is set by the data: {dataset.kind} data trains prompts "
                             f"{prompt_attention!r}, not {model_over['prompt_attention']!r}; drop the flag")
        tok = dataset.tok  # bytes, a BPE tokenizer trained just now, or the AR checkpoint's
        base = dict(vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id,
                    mask_id=tok.mask_id, seq_len=seq_len, prompt_attention=prompt_attention, **arch)
        fixed = [f"--{k}={model_over[k]} (the tokenizer has {base[k]})" for k in ("vocab_size", "pad_id", "eos_id",
                 "mask_id") if k in model_over and model_over[k] != base[k]]
        if fixed:
            raise ValueError("the vocabulary is set by the tokenizer (--tokenizer, --bpe_vocab); drop "
                             + ", ".join(fixed))
        cfg = ModelConfig(**{**base, **model_over})
        if tc.tokenizer == "bpe" and (not dist.is_initialized() or dist.get_rank() == 0):
            bpb = tok.bytes_per_token().float()
            print(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens (mean {bpb[bpb > 0].mean():.2f} bytes per token)")
    if cfg.model not in MODEL_TYPES:
        raise ValueError(f"model must be one of {MODEL_TYPES}, got {cfg.model!r}")
    if getattr(dataset, "skipped", 0):
        print(f"skipped {dataset.skipped} examples of {tc.data} longer than seq_len={cfg.seq_len}")
    # the global batch must split into equal micro-batches over processes x grad_accum
    n_micro = tc.grad_accum * (dist.get_world_size() if dist.is_initialized() else 1)
    if tc.grad_accum < 1 or tc.batch_size % n_micro != 0:
        raise ValueError(f"batch_size={tc.batch_size} must split evenly into {n_micro} micro-batches "
                         f"(processes x grad_accum)")
    return cfg, ckpt, dataset


# -----------------------------------------------------------------------------
# Learning rate, checkpoints, evaluation.


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < tc.warmup_steps:  # small steps while AdamW's moment estimates settle
        return tc.lr * (step + 1) / tc.warmup_steps
    # progress in [0, 1] after warmup: lr goes from tc.lr down to tc.min_lr along a half cosine
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def save_checkpoint(path, model, optimizer, step, tc, metrics, best_val_nelbo=math.inf, tok=None):
    """Write to a temporary file, then rename: a crash never leaves a half-written ckpt, and
    a failed write (a full disk, a folder that went away) leaves the previous checkpoint as
    it was and no .tmp behind. The config is saved as a dict, so
    models.model_from_checkpoint can rebuild the model; the checksum of the weights lets
    models.load_checkpoint refuse a file whose bytes changed after it was written. The
    tokenizer is saved too (a BPE tokenizer as its JSON string): no side file to lose."""
    # everything a resumed run needs to continue exactly: weights, AdamW moments, the step
    weights = model.state_dict()
    state = {
        "config": asdict(model.cfg),  # the model's kind is config["model"], stored once
        "train_config": asdict(tc),
        "model": weights,
        "checksum": weights_checksum(weights),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "metrics": metrics,
        "best_val_nelbo": best_val_nelbo,
        "tokenizer": (tok or data.ByteTokenizer()).to_dict(),  # data.tokenizer_from_dict rebuilds it
    }
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "no checkpoint was written"
        raise ValueError(f"cannot write the checkpoint {path}: {e.strerror or e} ({kept})") from None


def format_metrics(m: dict, speed: bool = False) -> str:
    """One evaluation line: every NELBO figure with its standard error; with `speed` (on a
    GPU, or given --peak_tflops) also the training speed so far, and MFU if the peak is known."""
    s = f"val_nelbo={m['val_nelbo']:.4f} ± {m['val_nelbo_se']:.4f} nats/token"
    if "val_nelbo_per_byte" in m:
        s += (f", {m['val_nelbo_per_byte']:.4f} ± {m['val_nelbo_per_byte_se']:.4f} nats/byte, "
              f"{m['val_bits_per_byte']:.4f} ± {m['val_bits_per_byte_se']:.4f} bits/byte, "
              f"perplexity <= {m['val_ppl_bound']:.3f} ± {m['val_ppl_bound_se']:.3f}")
    s += f" exact_match={m['exact_match']:.3f}"
    if speed:
        s += f"; training {m['train_tokens_per_s']:.0f} tokens/s, {m['train_tflops_per_s']:.3g} model TFLOP/s"
        if "mfu" in m:
            s += f", MFU {100 * m['mfu']:.2f}% (of {m['peak_tflops']:g} TFLOP/s per device)"
    return s


def speed_metrics(tokens: int, flops: float, seconds: float, world: int, peak) -> dict:
    """Training speed over `seconds` of training steps (all processes together): tokens/s,
    the model's TFLOP/s (models.train_flops_per_token) and, where the device's bf16 peak is
    known (TFLOP/s), MFU = model FLOP/s / (processes x peak)."""
    out = {"train_tokens_per_s": tokens / max(seconds, 1e-9), "train_tflops_per_s": flops / max(seconds, 1e-9) / 1e12}
    if peak:
        out.update(mfu=out["train_tflops_per_s"] / (world * peak), peak_tflops=peak)
    return out


def now_utc() -> str:
    """The time of a log row, e.g. 2026-11-23T21:40:05Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def keep_log_until(path: str, step: int) -> None:
    """Drop the log lines of steps after `step` (left by a run that was killed)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


@torch.no_grad()
def evaluate(model, dataset, tc, device, autocast):
    """Validation NELBO per token with its standard error (fixed held-out batches, fixed
    noise; the exact estimate of models.eval_nelbo, over all of t in [0, 1] whatever
    [t_min, t_max] training used); for plain text also per byte, bits per byte and the
    perplexity bound. For seq2seq data, the exact-match accuracy of answers sampled for
    held-out prompts (and how fast they were sampled: tokens/s, timed around generate)."""
    cfg = model.cfg
    model.eval()  # no dropout
    # 1. the NELBO of held-out examples: the same examples and the same noise at every
    #    evaluation, so two evaluations differ only by the weights
    g = torch.Generator(device=device).manual_seed(tc.seed)
    val = dataset.val_examples(tc.eval_batches * tc.batch_size, tc.seed)
    batches = [dataset.collate(val[i:i + tc.batch_size], cfg.block_len, cfg.seq_len).to(device)
               for i in range(0, len(val), tc.batch_size)]
    text = dataset.kind == "text"
    with autocast:
        est = eval_nelbo(model, [(b.x0, b.prompt_mask) for b in batches], tc.eval_draws, g,
                         dataset.tok.bytes_per_token() if text else None)
    fig = est.figures()
    metrics = {"val_nelbo": fig["nelbo_per_token"], "val_nelbo_se": fig["nelbo_per_token_se"],
               "exact_match": float("nan")}
    if text:  # per byte, bits per byte, the perplexity bound
        metrics.update({"val_" + k: v for k, v in fig.items() if not k.startswith("nelbo_per_token")})
    # 2. seq2seq: sample answers for held-out prompts with the cached sampler; an answer is
    #    right only if it is exactly the target (what the user of the model sees)
    if dataset.kind == "seq2seq":
        examples = dataset.val_examples(tc.eval_examples, tc.seed + 10_000)
        correct, new_tokens, seconds = 0, 0, 0.0
        for i in range(0, len(examples), tc.batch_size):
            chunk = examples[i:i + tc.batch_size]
            t0 = time.perf_counter()
            with autocast:
                res = generate(model, [p for p, _ in chunk], steps=tc.sample_steps or None)
            if is_cuda(device):
                torch.cuda.synchronize()  # GPU work is asynchronous: wait before reading the clock
            seconds += time.perf_counter() - t0
            correct += sum(ids == a for ids, (_, a) in zip(res.tokens, chunk))
            new_tokens += res.new_tokens
        metrics.update(exact_match=correct / len(examples),
                       sample_tokens_per_s=new_tokens / max(seconds, 1e-9))
    model.train()
    return metrics


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
        """Give the signals back to whoever handled them before (tests call train() often)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        """The signal handler: only set a flag; the loop checks it between steps."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving after this step (again to abort)", file=sys.stderr)

    def agreed(self, device) -> bool:
        """True if any process was asked to stop (all of them then stop at the same step)."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag)  # sum over processes: > 0 if any process was asked
        return flag.item() > 0


# -----------------------------------------------------------------------------
# The training loop.


def train(cfg: ModelConfig, tc: TrainConfig, device: str, ckpt=None, dataset=None,
          stop: "StopRequest | None" = None) -> dict:
    """Train; return the final step, the last evaluation, the loss curve and the model.
    Under torchrun every process runs this; rank 0 alone evaluates, logs and saves.
    stop: main() passes the StopRequest that its signal handlers set (a first Ctrl-C or
    SIGTERM ends the run after the current step, saved); a caller that imports train()
    (tests, notebooks, finetune.py's runs of train.py) keeps its own signal handling.

    Every step is a pure function of (seed, step): its examples, its noise and its dropout.
    So a run resumed from a checkpoint, or split over processes / micro-batches, follows
    the same loss curve as one uninterrupted process (the tests check both)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    main_process = rank == 0
    if dataset is None:
        dataset, _ = data.load_dataset(asdict(tc), cfg.block_len, cfg.seq_len)
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    log_path = os.path.join(tc.out_dir, "log.jsonl")
    best_path = os.path.join(tc.out_dir, "best.pt")

    # the model and the optimizer (AdamW, betas of GPT training), from scratch or from the
    # checkpoint; the same seed gives every process the same initial weights
    torch.manual_seed(tc.seed)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95),
                                  weight_decay=tc.weight_decay)
    step, metrics, best = 0, {}, math.inf  # best: the lowest validation NELBO so far
    if ckpt is None and tc.init_from:  # the paper's recipe: start from an AR model's weights
        copied = init_from_checkpoint(model, load_checkpoint(tc.init_from, device), dataset.tok.to_dict())
        if main_process:
            print(f"initialised from {tc.init_from}: {copied}")
    if ckpt is not None:
        model.load_state_dict(upgrade_state_dict(ckpt["model"]))
        optimizer.load_state_dict(upgrade_optimizer_state(ckpt["optimizer"], list(ckpt["model"]),
                                                          [name for name, _ in model.named_parameters()]))
        step, metrics = ckpt["step"], ckpt.get("metrics", {})
        best = ckpt.get("best_val_nelbo", math.inf)
        if main_process:
            print(f"resumed from {ckpt_path} at step {step}")
    if main_process:
        os.makedirs(tc.out_dir, exist_ok=True)
        keep_log_until(log_path, step)  # a resumed run rewrites what came after its checkpoint
        with open(os.path.join(tc.out_dir, "config.json"), "w") as f:  # what this run is, readable
            json.dump({"model": asdict(cfg), "train": asdict(tc)}, f, indent=2)
    # precision (--dtype): by default bf16 autocast on a GPU (the weights stay float32; norms,
    # softmax and the loss are computed in float32 inside the model), plain float32 on the CPU
    autocast = autocast_for(device, tc.dtype)
    # `fwd` is what the loop calls: the model, maybe compiled, maybe wrapped in DDP; `model`
    # stays the plain module that is evaluated and saved
    fwd = torch.compile(model) if tc.compile else model
    if world > 1:  # gradients are averaged over the processes during backward (DDP must be told
        # of parameters that get none: the model's registry entry says, models.MODELS)
        fwd = DDP(fwd, device_ids=[torch.device(device).index] if is_cuda(device) else None,
                  find_unused_parameters=model_spec(cfg.model).unused_parameters(cfg))
    if main_process:  # one line that says what is being trained
        layers = model_spec(cfg.model).depth(cfg)
        source = tc.data or f"task={tc.task}"
        backend = f" ({dist.get_backend()})" if dist.is_initialized() else ""  # under torchrun: nccl or gloo
        print(f"{cfg.model}: {model.num_params() / 1e6:.2f}M parameters, {layers}, block_len={cfg.block_len}, "
              f"seq_len={cfg.seq_len}, {source}, device={device}, processes={world}{backend}")
    # the speed it reports: tokens/s, the model's FLOP/s (models.train_flops_per_token) and MFU,
    # against the device's dense bf16 peak: NVIDIA's figure for a known GPU, or --peak_tflops
    peak = tc.peak_tflops or peak_bf16_tflops(device)
    speed = bool(peak) or is_cuda(device)  # in every evaluation line then (the bar always has tokens/s)
    if main_process and speed:
        where = torch.cuda.get_device_name(torch.device(device)) if is_cuda(device) else "the CPU"
        source = "--peak_tflops" if tc.peak_tflops else "NVIDIA's datasheet figure, dense bf16"
        print(f"MFU against a peak of {peak:g} TFLOP/s per device ({source}) on {where}" if peak else
              f"MFU: the dense bf16 peak of {where} is not known here; give it with --peak_tflops")

    # the loop's state: the noise generator (seeded per micro-batch below, so that runs with
    # other numbers of processes draw the same x_t), the stop flag, and what is reported
    noise = torch.Generator(device=device)
    stop = stop or StopRequest(install=False)  # never requested unless main() installed it
    losses, train_tokens, train_flops, train_seconds = [], 0, 0.0, 0.0
    micro = tc.batch_size // (world * tc.grad_accum)  # examples per micro-batch
    model.train()
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0,
               **({} if main_process else {"disable": True}))  # (TQDM_DISABLE=1 hides it too)
    t_last, tokens_since, flops_since = time.perf_counter(), 0, 0.0
    if main_process and step == 0:  # where training starts: the first point of every curve
        # (logged only: no checkpoint, and best.pt stays for weights that have trained)
        start = evaluate(model, dataset, tc, device, autocast)
        bar.write(f"step 0: {format_metrics(start)}")
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": 0, "time": now_utc(), **start}) + "\n")
    while step < tc.max_steps:
        t_step = time.perf_counter()
        # 0. this step's learning rate, and the seed of its dropout
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        torch.manual_seed(tc.seed * 7919 + step)  # dropout of a step is fixed too
        # 1. the global batch is a pure function of (seed, step); it is cut into
        #    world * grad_accum micro-batches and this process takes grad_accum of them
        examples = dataset.train_examples(tc.batch_size, tc.seed, step)
        step_loss, step_tokens, step_flops = 0.0, 0, 0.0
        for a in range(tc.grad_accum):
            j = rank * tc.grad_accum + a  # global index of the micro-batch
            batch = dataset.collate(examples[j * micro:(j + 1) * micro], cfg.block_len, cfg.seq_len).to(device)
            noise.manual_seed(tc.seed * 7919 + step * 1009 + j)  # its noise depends on j, not on world
            # 2. forward (noise x0 -> x_t, encode x0, decode x_t, loss) and backward; the
            #    gradient is the mean over micro-batches (DDP averages over processes)
            sync = a == tc.grad_accum - 1 or world == 1
            with (nullcontext() if sync else fwd.no_sync()), autocast:
                out = fwd(batch.x0, batch.prompt_mask, noise, LossOptions(train_loss=tc.train_loss))
            (out.loss / tc.grad_accum).backward()
            step_loss += out.loss.detach().float() / (tc.grad_accum * world)
            step_tokens += batch.x0.numel()
            step_flops += batch.x0.numel() * train_flops_per_token(model, batch.x0.shape[1])
        if world > 1:  # the loss of the global batch, the same number on every process
            dist.all_reduce(step_loss)
        # a NaN/inf loss would poison the weights: stop before the update, keep the checkpoint
        if not math.isfinite(step_loss.item()):
            bar.close()
            kept = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written yet"
            raise FloatingPointError(f"the loss became {step_loss.item()} at step {step + 1}: stopping "
                                     f"before the update ({kept}). Try a lower --lr.")
        # 3. the update: clip the gradient norm (one bad batch cannot throw the weights far),
        #    AdamW step, gradients cleared for the next step
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss.item())
        if is_cuda(device):
            torch.cuda.synchronize()  # GPU work is asynchronous: wait for the step before reading the clock
        train_seconds += time.perf_counter() - t_step
        train_tokens += step_tokens * world
        train_flops += step_flops * world
        # 4. progress bar, log, evaluation, checkpoint (rank 0). The log has one line per
        #    step and one per evaluation; a checkpoint is written after every evaluation.
        if main_process:
            bar.update(1)
            tokens_since += step_tokens * world
            flops_since += step_flops * world
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "time": now_utc(), "loss": losses[-1],
                                    "lr": lr_at(step - 1, tc)}) + "\n")
            if step % 10 == 0:  # the bar shows the loss, training tokens/s and MFU of the last 10 steps
                now = time.perf_counter()
                last = speed_metrics(tokens_since, flops_since, now - t_last, world, peak)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{last['train_tokens_per_s']:.0f}",
                                **({"mfu": f"{100 * last['mfu']:.1f}%"} if peak else {}))
                t_last, tokens_since, flops_since = now, 0, 0.0
            if step % tc.eval_every == 0 or step == tc.max_steps:
                metrics = evaluate(model, dataset, tc, device, autocast)
                metrics.update(speed_metrics(train_tokens, train_flops, train_seconds, world, peak))  # so far
                bar.write(f"step {step}: {format_metrics(metrics, speed)}")
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "time": now_utc(), **metrics}) + "\n")
                # the evaluation's noise is fixed, so val_nelbo compares across evaluations
                improved = metrics["val_nelbo"] < best
                best = min(best, metrics["val_nelbo"])
                save_checkpoint(ckpt_path, model, optimizer, step, tc, metrics, best, dataset.tok)
                if tc.keep_evals:  # a copy that the next evaluation does not replace
                    shutil.copyfile(ckpt_path, os.path.join(tc.out_dir, f"ckpt_{step}.pt"))
                if improved:  # best.pt: the weights with the lowest validation NELBO so far
                    save_checkpoint(best_path, model, optimizer, step, tc, metrics, best, dataset.tok)
            elif tc.save_every and step % tc.save_every == 0:  # a checkpoint between evaluations
                save_checkpoint(ckpt_path, model, optimizer, step, tc, metrics, best, dataset.tok)
        # 5. Ctrl-C / SIGTERM: the step is whole, so save it and leave (exit code 130)
        if stop.agreed(device):
            bar.close()
            if main_process:
                save_checkpoint(ckpt_path, model, optimizer, step, tc, metrics, best, dataset.tok)
                print(f"stopped: saved step {step} to {ckpt_path}; continue with --resume")
            return {"step": step, "metrics": metrics, "losses": losses, "model": model, "stopped": True}
    # max_steps reached: hand back what the caller (main, bench.py, tests, notebooks) reads
    bar.close()
    if main_process and not metrics:  # nothing trained in this run, no metrics in the checkpoint
        metrics = evaluate(model, dataset, tc, device, autocast)
    return {"step": step, "metrics": metrics, "losses": losses, "model": model, "stopped": False,
            **speed_metrics(train_tokens, train_flops, train_seconds, world, peak)}


# -----------------------------------------------------------------------------
# main: flags, torchrun, clear errors, the final machine-readable line.


def start_distributed(device: str) -> None:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK: NCCL on this process's GPU (device
    is already cuda:<LOCAL_RANK>, see models.pick_device), or gloo on the CPU."""
    if is_cuda(device):
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def end_distributed(finished: bool) -> None:
    """Leave the process group so that no process aborts at exit. Two hazards at teardown:
    (1) a process that closes its connections while another is still working or still
    inside its last collective (rank 0 evaluates and saves alone after the last step;
    on a stop request rank 0 saves while the others have nothing left to do): the
    barrier makes every process wait until all have finished; (2) destroy_process_group
    only drops the registry's reference to the group: anything else still holding it (a
    DDP wrapper kept alive by a reference cycle or a traceback) keeps gloo's worker
    threads alive until the interpreter is being torn down, and freeing their tensors
    then aborts the process (SIGABRT). gc.collect() frees those holders first, while
    Python is fully alive, so the group is really destroyed here. After an error the
    other processes may be gone or stuck, so no barrier then."""
    if finished:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def main(argv=None):
    """python train.py [--flags]: setup, train, print the final line. A ValueError is the
    user's mistake (a flag, a file, a checkpoint): one line "error: ...", exit code 1,
    printed once (under torchrun by rank 0 only; the other processes exit quietly)."""
    model_over, train_over = parse_args(argv)
    try:
        model_over, train_over, recipe = with_init_recipe(model_over, train_over)
        if recipe and os.environ.get("RANK", "0") == "0":
            print("--init_from: the fine-tuning recipe sets " + " ".join(f"--{k}={v}" for k, v in recipe.items()))
        tc = training_config(train_over)  # with --resume: the checkpoint's, plus the flags
        validate_train_config(tc)
        if tc.threads:  # on a busy machine torch's default (all cores) thrashes: see README
            torch.set_num_threads(tc.threads)
        # torchrun sets LOCAL_RANK: each process then uses the GPU of its local rank
        local_rank = int(os.environ["LOCAL_RANK"]) if "RANK" in os.environ else None
        device = pick_device(tc.device, local_rank)
    except ValueError as e:  # under torchrun every process finds the same mistake: rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if "RANK" in os.environ:  # started by torchrun: one process per device
        start_distributed(device)
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    stop = StopRequest()  # Ctrl-C / SIGTERM: finish the step, save, exit
    error = None
    try:
        cfg, ckpt, dataset = setup(tc, model_over, device)
        result = train(cfg, tc, device, ckpt, dataset, stop)
    except (ValueError, FloatingPointError) as e:  # the user's mistake: a message, no stack trace
        error = str(e)  # (kept as text: the exception's traceback would keep train()'s DDP
        #                 wrapper, and through it the process group, alive past the teardown)
    finally:
        stop.restore()
        if dist.is_initialized():
            end_distributed(finished=error is None)
    if error is not None:
        if main_process:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if result["stopped"]:
        sys.exit(130)  # the shell's code for "interrupted"
    if main_process:
        m = result["metrics"]
        print(f"final step={result['step']} val_nelbo={m['val_nelbo']:.4f} "
              f"val_nelbo_se={m['val_nelbo_se']:.4f} exact_match={m['exact_match']:.4f}")


if __name__ == "__main__":
    main()
