"""
What the scripts (train.py, sample.py, bench.py) do with any model: build it by name,
reload it from a checkpoint, estimate its NELBO on held-out data, pick the device and the
precision, and count its training FLOPs (for MFU).

This file exists so that e2d2.py can tell E2D2 alone: the registry has to see all four
models, and e2d2.py must not import baselines.py (which imports e2d2.py).

A checkpoint is a dict saved by train.py: the model config as a dict (asdict), the
weights, and for training the optimizer state and the step. The model is rebuilt from
the saved config, so a checkpoint needs no flags to be read back.
"""

import functools
import hashlib
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch._dynamo
from tqdm import tqdm

import data
from baselines import AR, BD3LM, MDLM
from e2d2 import E2D2, ModelConfig, TokenModel, noise_schedule

MODELS = {"e2d2": E2D2, "ar": AR, "mdlm": MDLM, "bd3lm": BD3LM}  # ModelConfig.model -> class
MODEL_TYPES = tuple(MODELS)


def build_model(cfg: ModelConfig) -> TokenModel:
    """The model that cfg.model names, freshly initialised."""
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {MODEL_TYPES}, got {cfg.model!r}")
    return MODELS[cfg.model](cfg)


RENAMED_SCHEDULES = {"exp": "power"}  # a checkpoint's schedule name -> today's (same alpha(t))


def config_from_dict(d: dict, prompt_attention: str = "bidirectional") -> ModelConfig:
    """The ModelConfig saved in a checkpoint; keys this code does not know are an error
    (they mean the checkpoint was written by other code). prompt_attention: the value for
    a checkpoint saved before that field existed (the caller knows from the saved training
    config whether the data was plain text, see data.prompt_attention_of)."""
    unknown = sorted(set(d) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ValueError(f"checkpoint config has unknown keys {unknown}")
    d = {**d, "schedule": RENAMED_SCHEDULES.get(d.get("schedule"), d.get("schedule", "linear"))}
    return ModelConfig(**{"prompt_attention": prompt_attention, **d})


def load_checkpoint(path: str, device, need=("config", "model")) -> dict:
    """Read a checkpoint file; ValueError with a clear message if it is missing, is not a
    torch file, or lacks one of the keys in `need` (training also needs optimizer, step)."""
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path} (train one with: python train.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated, or not a torch file at all
        raise ValueError(f"cannot read checkpoint {path} ({e.__class__.__name__}); it is corrupt "
                         f"or not a checkpoint") from None
    missing = sorted(set(need) - set(ckpt if isinstance(ckpt, dict) else ()))
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this project (missing {missing})")
    # checkpoints written before checksums existed have none; every newer one must match
    if "checksum" in ckpt and weights_checksum(ckpt["model"]) != ckpt["checksum"]:
        raise ValueError(f"{path}: the weights do not match the checksum saved with them; the file "
                         f"was damaged after it was written (use an earlier or best.pt checkpoint)")
    return ckpt


def weights_checksum(state_dict: dict) -> str:
    """SHA-256 of every tensor's name and raw bytes, in name order: saved beside the
    weights, recomputed on load, so a flipped byte in a stored tensor is caught."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def upgrade_state_dict(state_dict: dict) -> dict:
    """Weights saved before the attention projections were fused hold `attn.q` and `attn.kv`
    per layer: stacked (rows W_q, then W_k, W_v) they are today's `attn.qkv`, the same map."""
    out = dict(state_dict)
    for name in [n for n in out if n.endswith("attn.q.weight")]:
        stem = name[:-len("q.weight")]
        out[stem + "qkv.weight"] = torch.cat([out.pop(name), out.pop(stem + "kv.weight")])
    return out


def upgrade_optimizer_state(opt_state: dict, old_names: list, new_names: list) -> dict:
    """The AdamW state saved beside weights that upgrade_state_dict stacks. torch keys it by
    parameter index: old_names are the saved weights' names in that order (the state dict's
    order), new_names today's model's. The moments of `attn.q` and `attn.kv` are stacked
    like the weights (Adam's moments are elementwise, so the stacked state is exactly the
    state the fused matrix would have had); every other parameter keeps its own."""
    if not any(n.endswith("attn.q.weight") for n in old_names):
        return opt_state
    if len(opt_state["param_groups"]) != 1:
        raise ValueError("cannot upgrade an optimizer state with several parameter groups")
    old = {name: opt_state["state"].get(i) for i, name in enumerate(old_names)}
    state = {}
    for j, name in enumerate(new_names):
        stem = name[:-len("qkv.weight")] if name.endswith("attn.qkv.weight") else None
        if stem is not None and stem + "q.weight" in old:
            q, kv = old[stem + "q.weight"], old[stem + "kv.weight"]
            if q is not None and kv is not None:  # no state yet (before the first step): none
                state[j] = {k: torch.cat([q[k], kv[k]]) if q[k].dim() else q[k] for k in q}
        elif old.get(name) is not None:
            state[j] = old[name]
    groups = [{**g, "params": list(range(len(new_names)))} for g in opt_state["param_groups"]]
    return {"state": state, "param_groups": groups}


def model_from_checkpoint(ckpt: dict, device, model_type: str = "") -> TokenModel:
    """Rebuild the model from a checkpoint's config and load its weights (eval mode).
    model_type: if given, the checkpoint must hold that kind of model."""
    saved = ckpt["config"].get("model", "e2d2")
    if model_type and saved != model_type:
        raise ValueError(f"the checkpoint holds a {saved!r} model, not {model_type!r}")
    try:
        cfg = config_from_dict(ckpt["config"], data.prompt_attention_of(ckpt.get("train_config") or {}))
        model = build_model(cfg).to(device)
        model.load_state_dict(upgrade_state_dict(ckpt["model"]))
    except RuntimeError as e:  # weights of another shape or name
        raise ValueError(f"the checkpoint does not match this code's models: {e}") from None
    return model.eval()


# ---------------------------------------------------------------------------------------
# Starting from an autoregressive model, as the paper does (it starts from a pretrained
# Qwen3): the diffusion models reuse every weight an AR model of the same width has.
# ---------------------------------------------------------------------------------------

# config fields that must agree for the AR weights to fit (the vocabulary's ids included)
INIT_SHAPE_FIELDS = ("vocab_size", "d_model", "n_heads", "pad_id", "eos_id", "mask_id")


def init_from_ar(model: TokenModel, ar_ckpt: dict, tokenizer: Optional[dict] = None) -> None:
    """Copy the weights of an AR checkpoint into a freshly built E2D2, BD3-LM or MDLM.

    - the token embedding (and so the tied output head) and the final norm: as they are;
    - E2D2: encoder layer i = AR layer i (N_enc = the AR's N), the encoder's final norm
      h = enc_norm(.) = the AR's final norm, and decoder layer j = a copy of AR layer
      N - N_dec + j: the decoder starts as the AR's TOP N_dec layers, the paper's choice
      (its decoder is initialised from the last layers of the pretrained model);
    - BD3-LM and MDLM: layer i = AR layer i (same N).
    Right after this, an E2D2 with block_len = 1 and no prompt has a causal encoder, so h
    equals the AR model's final hidden state (a test checks it). The decoder is not the
    AR's function: its clean keys/values now come from h (projected by copies of the AR's
    top layers, the "hidden" variant) or from the encoder's top layers (shared_kv), where
    in the AR each layer read its own depth. tokenizer: the new run's tokenizer
    (ckpt["tokenizer"] format), which must be the AR's. Raises ValueError naming what does
    not match."""
    cfg = model.cfg
    if ar_ckpt["config"].get("model") != "ar":
        raise ValueError(f"--init_from needs a checkpoint of an 'ar' model, this one holds a "
                         f"{ar_ckpt['config'].get('model', 'e2d2')!r} model")
    if cfg.model == "ar":
        raise ValueError("--init_from initialises a diffusion model (e2d2, bd3lm, mdlm) from an AR one; "
                         "to continue training an AR model use --resume")
    ar_tok = data.tokenizer_from_dict(ar_ckpt.get("tokenizer")).to_dict()
    if tokenizer is not None and tokenizer != ar_tok:
        raise ValueError(f"--init_from: the AR checkpoint used another tokenizer ({ar_tok['kind']}, "
                         f"{data.tokenizer_from_dict(ar_tok).vocab_size} tokens) than this run "
                         f"({tokenizer['kind']}, {data.tokenizer_from_dict(tokenizer).vocab_size} tokens)")
    ar_cfg = ar_ckpt["config"]
    diff = [f"{k}: AR {ar_cfg.get(k)} vs new {getattr(cfg, k)}" for k in INIT_SHAPE_FIELDS
            if ar_cfg.get(k) != getattr(cfg, k)]
    n_ar = ar_cfg["n_enc"]  # the AR's N layers
    if cfg.n_enc != n_ar:
        diff.append(f"n_enc: the AR has {n_ar} layers, the new model's {'encoder' if cfg.model == 'e2d2' else 'stack'} "
                    f"{cfg.n_enc}")
    if cfg.model == "e2d2" and cfg.n_dec > n_ar:
        diff.append(f"n_dec={cfg.n_dec}: the decoder copies the AR's top layers, it has only {n_ar}")
    if diff:
        raise ValueError("--init_from: the AR checkpoint does not fit this model (" + "; ".join(diff) + ")")
    ar = ar_ckpt["model"]  # the AR's state dict: embed.*, norm.*, layers.<i>.*
    new = {}
    for name in model.state_dict():
        if name.startswith(("embed.", "norm.")):
            src = name
        elif name.startswith("layers."):  # BD3-LM / MDLM: the same stack
            src = name
        elif name.startswith("encoder."):  # [E2D2] encoder layer i <- AR layer i
            src = "layers." + name[len("encoder."):]
        elif name.startswith("decoder."):  # [E2D2] decoder layer j <- AR layer N - N_dec + j
            j, rest = name[len("decoder."):].split(".", 1)
            src = f"layers.{n_ar - cfg.n_dec + int(j)}.{rest}"
        elif name.startswith("enc_norm."):  # [E2D2] h = the AR's final norm of the encoder output
            src = "norm." + name[len("enc_norm."):]
        else:
            raise ValueError(f"--init_from: no AR weight for {name}")
        new[name] = ar[src]
    model.load_state_dict(new)


# ---------------------------------------------------------------------------------------
# Evaluation: the NELBO estimate, with its standard error. One function for every model
# (AR's NLL is exact; the diffusion models' bound is estimated from draws of t and x_t).
# ---------------------------------------------------------------------------------------


# The bound integrates over ALL of t in [0, 1] (training may clip t to [t_min, t_max]).
# Written in the mask probability u = 1 - alpha(t) (du = -alpha'(t) dt), it is the integral
# over u of the masked tokens' summed NLL, a bounded integrand, for EVERY schedule: the NELBO
# weight -alpha'/(1 - alpha) times the ~L u masked tokens is -alpha' times their NLL. But a
# draw at small u masks a token with probability u and weighs it by ~1/u, so u ~ U[0, 1] has
# an unbounded variance. So, in u: importance sampling u = u0 + (u1 - u0) v^2, v ~ U[0, 1]
# (u0, u1: the mask probabilities at t = 0 and 1; density 1 / (2 v (u1 - u0)) in u, more
# draws near u0), t the time with 1 - alpha(t) = u, and each term times 1 / p(t) =
# 2 v (u1 - u0) / (-alpha'(t)): unbiased, and the variance is finite (it grows like
# int dv / v^2 * v^2 = 1 per token). v^2 floored at EVAL_FLOOR keeps the weight finite; it
# changes the NELBO by about EVAL_FLOOR of itself (the integrand is bounded). For the linear
# schedule this is t = v^2 with weight 2v.
EVAL_FLOOR = 1e-5


def time_at_mask_probability(schedule: str, u: torch.Tensor) -> torch.Tensor:
    """The t in [0, 1] with 1 - alpha(t) = u, elementwise: alpha falls with t, so bisection
    (60 halvings of [0, 1]: float64's precision) finds it for any schedule."""
    lo, hi = torch.zeros_like(u), torch.ones_like(u)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = 1.0 - noise_schedule(schedule, mid)[0] < u  # masks less than u: t is above mid
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def sample_t_eval(schedule: str, batch: int, n_blocks: int, generator=None, device=None):
    """Evaluation times and importance weights 1 / p(t), each (b, K), float64, drawn through
    the mask probability as above. The b*K values v = (i + r) / n share ONE r ~ U[0, 1) and
    are shuffled over the blocks: each is U[0, 1] alone (unbiased), together they cover
    [0, 1] evenly (as in MDLM)."""
    n = batch * n_blocks
    r = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
    v = (torch.arange(n, device=device, dtype=torch.float64) + r) / n  # (n,) one per stratum
    v = v[torch.randperm(n, generator=generator, device=device)].view(batch, n_blocks)
    ends = 1.0 - noise_schedule(schedule, torch.tensor([0.0, 1.0], dtype=torch.float64, device=device))[0]
    u0, u1 = ends.tolist()  # the mask probabilities at t = 0 and t = 1
    t = time_at_mask_probability(schedule, u0 + (u1 - u0) * (v * v).clamp(min=EVAL_FLOOR))
    return t, 2.0 * v * (u1 - u0) / -noise_schedule(schedule, t)[1]


def ratio_estimate(num: torch.Tensor, den: torch.Tensor) -> tuple[float, float]:
    """R = sum(num) / sum(den) over n sequences and its standard error (the delta method
    for a ratio of means): SE^2 = sum_i (num_i - R den_i)^2 / (n (n - 1) mean(den)^2).
    It treats the sequences as independent draws; the stratified t makes the draws of one
    batch negatively correlated, so this SE errs on the large side."""
    num, den = num.double(), den.double()
    r = (num.sum() / den.sum()).item()
    n = num.numel()
    if n < 2:
        return r, math.nan
    resid = num - r * den
    return r, math.sqrt((resid.pow(2).sum() / (n * (n - 1))).item()) / den.mean().item()


@dataclass
class NelboEstimate:
    """Per held-out sequence: the NELBO numerator (nats, averaged over the draws), the
    number of target tokens, and (if given a tokenizer's bytes per token) their bytes."""

    seq_nats: torch.Tensor  # (n,) float64
    seq_tokens: torch.Tensor  # (n,)
    seq_bytes: Optional[torch.Tensor] = None  # (n,)

    def per_token(self) -> tuple[float, float]:
        return ratio_estimate(self.seq_nats, self.seq_tokens)

    def per_byte(self) -> tuple[float, float]:
        """Total nats / total bytes (a tokenizer-independent figure), with its SE."""
        return ratio_estimate(self.seq_nats, self.seq_bytes)

    def figures(self) -> dict:
        """NELBO per token and the perplexity bound exp(NELBO per token); with bytes also
        the NELBO per byte and bits per byte. Each value has its standard error (the
        perplexity's by the delta method: SE(exp x) = exp(x) SE(x))."""
        nelbo, se = self.per_token()
        out = {"nelbo_per_token": nelbo, "nelbo_per_token_se": se,
               "ppl_bound": math.exp(nelbo), "ppl_bound_se": math.exp(nelbo) * se}
        if self.seq_bytes is not None:
            per_byte, se_b = self.per_byte()
            out.update(nelbo_per_byte=per_byte, nelbo_per_byte_se=se_b,
                       bits_per_byte=per_byte / math.log(2), bits_per_byte_se=se_b / math.log(2))
        return out


@torch.no_grad()
def eval_nelbo(model: TokenModel, batches, draws: int = 1, generator=None,
               bytes_per_token: Optional[torch.Tensor] = None, progress: bool = False) -> NelboEstimate:
    """Estimate the NELBO (AR: the exact NLL) of held-out data. batches: (x0, prompt_mask)
    pairs as the training forward takes them. Every sequence gets `draws` independent
    draws of (t, x_t) (t from sample_t_eval, x_t ~ q(x_t | x_0) with no re-masking: see
    e2d2.diffusion_forward); its contribution is their mean. bytes_per_token (V,): how
    many bytes each token id stands for, to report the figure per byte."""
    if draws < 1:
        raise ValueError(f"eval draws must be >= 1, got {draws}")
    draws = 1 if model.exact_likelihood else draws  # exact: nothing to average
    was_training = model.training
    model.eval()
    nats, tokens, n_bytes = [], [], []
    for x0, prompt_mask in tqdm(batches, desc="nelbo", leave=False, disable=not progress):
        seq = 0.0
        for _ in range(draws):
            out = model(x0, prompt_mask, generator=generator,
                        eval_t_sampler=functools.partial(sample_t_eval, model.cfg.schedule))
            seq = seq + out.row_nats.double() / draws  # (b,)
        scored = out.target_ids != model.cfg.pad_id  # the same targets in every draw
        nats.append(seq.cpu())
        tokens.append(scored.sum(1).cpu())
        if bytes_per_token is not None:
            per = bytes_per_token.to(x0.device)[out.target_ids]  # (b, L') bytes of each position
            n_bytes.append(torch.where(scored, per, 0).sum(1).cpu())
    if was_training:
        model.train()
    return NelboEstimate(torch.cat(nats), torch.cat(tokens),
                         torch.cat(n_bytes) if bytes_per_token is not None else None)


# ---------------------------------------------------------------------------------------
# Optional: the layer stacks compiled for sampling (sample.py --compile).
# ---------------------------------------------------------------------------------------


def compile_for_sampling(model: TokenModel) -> TokenModel:
    """torch.compile the model's layer stacks for sampling. Every model's network calls go
    through TokenModel.run (a stack of Layers), so that is what is compiled, in place, for
    this model object only. What it saves: the Python and dispatch overhead of the ~20
    small operations of a layer call, fused into a few generated kernels. The matrix
    multiplies stay the library's (aten::mm in a profile of a compiled generation). Plain
    torch.compile, no options: on this project's CPU benchmark neither max_autotune (its own
    C++ matrix multiply) nor freezing (weights packed as constants, MKL's packed multiply)
    made generation faster. The cost: one compilation per shape family at the first calls
    (tens of seconds on a CPU). Tokens can differ from eager in a near tie (fused
    kernels round differently); bench.py speedup --compile reports whether they did."""
    # each stack (encoder, decoder) and shape family (a new batch size, cache length) is one
    # entry of the compiled code's cache: room for them, instead of a fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.eval()
    model.run = torch.compile(model.run)
    return model


# ---------------------------------------------------------------------------------------
# Devices: one parser of the --device flag and one precision rule (--dtype) for every script.
# ---------------------------------------------------------------------------------------


def pick_device(flag: str = "auto", local_rank: Optional[int] = None) -> str:
    """--device -> a torch device string. "auto" is "cuda" when a GPU is visible, else
    "cpu"; "cuda", "cuda:N" and "cpu" are taken as given. Under torchrun (local_rank set)
    every process uses the GPU of its local rank: "cuda" or "cuda:N" becomes
    "cuda:<local_rank>". Anything else is a ValueError naming the flag."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(flag)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {flag!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():  # a CPU build, or no GPU visible
        raise ValueError(f"--device={flag}: this torch build sees no CUDA GPU "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device=cpu")
    if dev.type == "cuda" and local_rank is not None:
        return f"cuda:{local_rank}"
    return str(dev)


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


DTYPES = ("auto", "float32", "bfloat16")  # the values of every script's --dtype flag


def autocast_for(device, dtype: str = "auto"):
    """The precision the model runs in (--dtype), as a context manager to wrap its calls in.
    "bfloat16": bf16 autocast on the device (CUDA or a CPU): matrix multiplies and attention
    run in bf16, while the weights, the residual stream, the norms, the softmax of the output
    and the loss stay float32 (the model upcasts where it matters, see e2d2.py). "float32":
    plain float32. "auto": bf16 on any CUDA device ("cuda", "cuda:0", ...), whose tensor
    cores multiply bf16 many times faster than float32; float32 on the CPU, where bf16 is
    often emulated and slower (--dtype=bfloat16 still runs it there, for checks)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "bfloat16" if is_cuda(device) else "float32"
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------
# Model FLOPs utilisation (MFU, as in PaLM and nanoGPT): the FLOPs the model needs per
# second of training, over the most the device can do. The first are counted on paper
# (train_flops_per_token), the second is the maker's figure (PEAK_BF16_TFLOPS).
# ---------------------------------------------------------------------------------------


def train_flops_per_token(model: TokenModel, L: int) -> float:
    """The model FLOPs of one training step per token of a (b, L) batch: 3 x the forward's
    matrix multiplies (model.flops_per_token), since the backward pass multiplies twice as
    much (one product for the gradient of each layer's input, one for its weights'). Counted:
    every linear layer (2 FLOPs per weight per token: a multiply and an add), attention's
    scores and weighted sum (4 d per query-key pair, dense: masked-out pairs are computed
    too) and the tied head (2 d V). Left out: norms, softmax, RoPE, SiLU, the other
    elementwise ops (a few FLOPs per activation: under 1% of the total at width 512) and the
    optimizer. A test checks the count against torch's FlopCounterMode around a real forward
    and backward: they agree exactly."""
    return 3 * model.flops_per_token(L)


# The peak: the device's dense bf16 tensor-core throughput as NVIDIA's datasheets give it,
# the figure WITHOUT structured sparsity (the datasheets also print one "with sparsity",
# twice as large, which dense training never reaches). A100 (SXM and PCIe): 312 TFLOP/s;
# H100 SXM and H200 SXM: 989; H100 PCIe: 756; H100 NVL and H200 NVL: 835; L40S: 362; L40:
# 181; L4: 121. The first name found in the device's wins, so the more specific come first
# (an SXM part's name carries no "SXM": "NVIDIA H100 80GB HBM3"). Any other device:
# train.py --peak_tflops gives its peak.

PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))


def peak_bf16_tflops(device) -> Optional[float]:
    """The dense bf16 peak (TFLOP/s) of a CUDA device, by its name; None for a CPU or a
    device the table does not know."""
    if not is_cuda(device):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)
