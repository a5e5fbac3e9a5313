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
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch._dynamo
from tqdm import tqdm

import data
from baselines import AR, BD3LM, MDLM
from e2d2 import E2D2, ModelConfig, TokenModel, generate, noise_schedule

# ---------------------------------------------------------------------------------------
# The model registry: what the scripts need of each model type, in ONE entry per type
# (ModelConfig.model -> ModelSpec). Adding a model is adding an entry: a field left out is a
# TypeError at import, and the tests run every entry (build, train, sample, costs, --init_from).
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    cls: type  # the TokenModel subclass: logits, forward -> Loss, make_runner
    depth: Callable  # cfg -> how train.py and bench.py describe its layers ("N_enc=4, N_dec=2")
    training_cost: Callable  # cfg -> layer passes per data token of one training forward (bench.py)
    sampling_cost: Callable  # (cfg, use_cache, P, A, B, T) -> (layer-token passes, layer calls), whole answer
    has_cache: bool  # whether make_runner(use_cache=True) caches anything (MDLM: nothing can be)
    ar_weight: Callable  # (model, parameter name) -> the AR weight that --init_from copies into it, or None
    unused_parameters: Callable = lambda cfg: False  # cfg -> some parameters get no gradient (DDP must be told)


def same_stack(model, name: str) -> Optional[str]:
    """AR, BD3-LM, MDLM: one stack of N layers named as the AR's: every weight is the AR's own."""
    return name if name.startswith(("embed.", "norm.", "layers.")) else None


def e2d2_ar_weight(model, name: str) -> Optional[str]:  # [E2D2]
    """Encoder layer i <- AR layer i; decoder layer j <- AR layer model.pairs[j] (tied: the same
    tensor); enc_norm (h = enc_norm(encoder output)) <- the AR's final norm."""
    if name.startswith("encoder."):
        return "layers." + name[len("encoder."):]
    if name.startswith("decoder."):
        j, rest = name[len("decoder."):].split(".", 1)
        return f"layers.{model.pairs[int(j)]}.{rest}"
    return "norm." + name[len("enc_norm."):] if name.startswith("enc_norm.") else same_stack(model, name)


def e2d2_sampling_cost(cfg, use_cache, P, A, B, T):  # [E2D2]
    """Cached: the prompt through the encoder; per block T decoder calls on B tokens, then the
    encoder on the finished block (not after the last one). Uncached: every step re-runs
    encoder + decoder over the prompt and the blocks so far."""
    K, ne, nd = A // B, cfg.n_enc, cfg.n_dec
    if use_cache:
        return P * ne + K * T * B * nd + (K - 1) * B * ne, ne + K * T * nd + (K - 1) * ne
    return sum(T * (P + k * B) * (ne + nd) for k in range(1, K + 1)), K * T * (ne + nd)


def bd3lm_sampling_cost(cfg, use_cache, P, A, B, T):
    """As E2D2's, with all N layers at every denoising step (cached; uncached: N over 2 x the context)."""
    K, n = A // B, cfg.n_enc
    if use_cache:
        return P * n + K * T * B * n + (K - 1) * B * n, n + K * T * n + (K - 1) * n
    return sum(T * 2 * (P + k * B) * n for k in range(1, K + 1)), K * T * n


MODELS = {
    "e2d2": ModelSpec(E2D2, depth=lambda cfg: f"N_enc={cfg.n_enc}, N_dec={cfg.n_dec}",
                      training_cost=lambda cfg: cfg.n_enc + cfg.n_dec,  # N_enc over x_0, N_dec over x_t
                      sampling_cost=e2d2_sampling_cost, has_cache=True, ar_weight=e2d2_ar_weight,
                      # shared_kv never reads h: enc_norm, and whatever of the encoder comes after the
                      # last paired layer's keys/values, get no gradient
                      unused_parameters=lambda cfg: cfg.decoder == "shared_kv"),
    "ar": ModelSpec(AR, depth=lambda cfg: f"N={cfg.n_enc}", training_cost=lambda cfg: cfg.n_enc,
                    # the prompt, then one token per call
                    sampling_cost=lambda cfg, use_cache, P, A, B, T: (
                        ((P + A - 1) * cfg.n_enc, A * cfg.n_enc) if use_cache
                        else (sum(P + i for i in range(A)) * cfg.n_enc, A * cfg.n_enc)),
                    has_cache=True, ar_weight=same_stack),
    "mdlm": ModelSpec(MDLM, depth=lambda cfg: f"N={cfg.n_enc}", training_cost=lambda cfg: cfg.n_enc,
                      # as many steps as the block models take (K T), all N layers over P + A each time
                      sampling_cost=lambda cfg, use_cache, P, A, B, T: (A // B * T * (P + A) * cfg.n_enc,
                                                                         A // B * T * cfg.n_enc),
                      has_cache=False, ar_weight=same_stack),
    "bd3lm": ModelSpec(BD3LM, depth=lambda cfg: f"N={cfg.n_enc}",
                       training_cost=lambda cfg: 2 * cfg.n_enc,  # N layers over [x_0 ; x_t]: 2L tokens
                       sampling_cost=bd3lm_sampling_cost, has_cache=True, ar_weight=same_stack),
}
MODEL_TYPES = tuple(MODELS)


def model_spec(name: str) -> ModelSpec:
    """The registry entry of a model type; a clear error for a name it does not hold."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODEL_TYPES}, got {name!r}")
    return MODELS[name]


def build_model(cfg: ModelConfig) -> TokenModel:
    """The model that cfg.model names, freshly initialised."""
    return model_spec(cfg.model).cls(cfg)


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
# Starting from a trained model (train.py --init_from): from an AR model, as the paper does
# (it starts from a pretrained Qwen3), or from a model of the same kind, for new data.
# ---------------------------------------------------------------------------------------

# config fields that must agree for the weights to fit and to mean what they meant: the
# shapes, the vocabulary's special ids (an embedding row is a token) and RoPE's base
INIT_FIELDS = ("vocab_size", "pad_id", "eos_id", "mask_id", "d_model", "n_heads", "n_enc", "rope_base")
# and for an E2D2 into an E2D2, its decoder (the same weights read other keys otherwise)
E2D2_INIT_FIELDS = ("n_dec", "decoder", "decoder_layers", "tie_decoder")


def init_source_error(source: str, target: str) -> Optional[str]:
    """Why a `source` checkpoint cannot start a `target` model, or None if it can: an AR
    checkpoint starts any model, any checkpoint a model of its own kind."""
    if source == "ar" or source == target:
        return None
    return (f"--init_from takes an AR checkpoint (into any model) or a checkpoint of the model's own kind; "
            f"this one holds a {source!r} model and the new model is {target!r}")


def init_from_checkpoint(model: TokenModel, ckpt: dict, tokenizer: Optional[dict] = None) -> str:
    """Copy a checkpoint's weights into a freshly built model (train.py --init_from; the
    optimizer and the step start afresh). Returns one line that says what was copied.

    From an AR checkpoint (N layers), the paper's recipe:
    - the token embedding (and so the tied output head) and the final norm, as they are;
    - AR, BD3-LM, MDLM: layer i = AR layer i (AR into AR: plain fine-tuning on new data,
      the baseline the paper compares with);
    - E2D2: encoder layer i = AR layer i (N_enc = N), the encoder's final norm enc_norm =
      the AR's final norm, and decoder layer j = AR layer model.pairs[j] (top:
      N - N_dec + j; bottom: j). An untied decoder gets copies of those layers; a tied one
      (tie_decoder) IS those encoder layers, so it gets them with the encoder.
    From a checkpoint of the model's own kind: every weight as it is (the same logits).

    Right after an AR init, an E2D2 with block_len = 1 and no prompt has a causal encoder,
    so h equals the AR model's final hidden state (a test checks it). The decoder is not
    the AR's function: the "hidden" decoder projects h (the top of the stack) through
    layers that were trained on the hidden states at their own depth; shared_kv gives each
    decoder layer the encoder's keys/values at its paired depth, which is what that layer
    read in the AR model. tokenizer: the new run's (ckpt["tokenizer"] format), which must
    be the checkpoint's. Raises ValueError naming what does not fit."""
    cfg = model.cfg
    src = config_from_dict(ckpt["config"])  # (fields saved before they existed: their defaults)
    error = init_source_error(src.model, cfg.model)
    if error:
        raise ValueError(error)
    src_tok = data.tokenizer_from_dict(ckpt.get("tokenizer")).to_dict()
    if tokenizer is not None and tokenizer != src_tok:
        raise ValueError(f"--init_from: the checkpoint used another tokenizer ({src_tok['kind']}, "
                         f"{data.tokenizer_from_dict(src_tok).vocab_size} tokens) than this run "
                         f"({tokenizer['kind']}, {data.tokenizer_from_dict(tokenizer).vocab_size} tokens)")
    label = "AR" if src.model == "ar" else "checkpoint"
    must_agree = INIT_FIELDS + (E2D2_INIT_FIELDS if src.model == cfg.model == "e2d2" else ())
    diff = [f"{k}: {label} {getattr(src, k)} vs new {getattr(cfg, k)}" for k in must_agree
            if getattr(src, k) != getattr(cfg, k)]
    if src.model == "ar" and cfg.model == "e2d2" and cfg.n_dec > src.n_enc:
        diff.append(f"n_dec={cfg.n_dec}: the decoder copies the AR's layers, it has only {src.n_enc}")
    if diff:
        raise ValueError(f"--init_from: the {'AR ' if src.model == 'ar' else ''}checkpoint does not fit this model ("
                         + "; ".join(diff) + ")")
    weights = upgrade_state_dict(ckpt["model"])
    if src.model == cfg.model:  # the same kind: every weight as it is
        model.load_state_dict(weights)
        return f"every weight of the {cfg.model} checkpoint"
    new = {}
    for name in model.state_dict():  # the AR's state dict: embed.*, norm.*, layers.<i>.*
        source = model_spec(cfg.model).ar_weight(model, name)  # the model says which AR weight is its own
        if source not in weights:
            raise ValueError(f"--init_from: a {cfg.model} model cannot start from an AR checkpoint "
                             f"(no AR weight for its parameter {name})")
        new[name] = weights[source]
    model.load_state_dict(new)
    if cfg.model != "e2d2":
        return f"every layer of the AR model ({src.n_enc} layers)"
    decoder = "tied to" if cfg.tie_decoder else "copies of"  # [E2D2]
    return (f"encoder = the AR's {src.n_enc} layers, decoder = {decoder} its layers {model.pairs} "
            f"({cfg.decoder_layers}), {cfg.decoder} keys/values")


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


@torch.no_grad()
def answer_pairs(model: TokenModel, pairs: list, tok, batch_size: int = 64, progress: bool = False, **sampling) -> dict:
    """Answer seq2seq pairs (source, target strings) with e2d2.generate (`sampling`: its
    keyword arguments: steps, strategy, temperature, ...) and score the answers against the
    targets: exact match (a fraction), corpus BLEU, chrF and ROUGE-L (in %, data.py says which
    BLEU). A source too long to leave room for one answer block is skipped and counted.
    Returns the scores, the counts and the answers."""
    cfg, kept, skipped = model.cfg, [], 0
    for src, tgt in pairs:
        ids = tok.encode(src)
        if data.ceil_to(len(ids), cfg.block_len) + cfg.block_len > cfg.seq_len:
            skipped += 1  # no room left to answer this source
        else:
            kept.append((ids, tgt))
    if not kept:
        raise ValueError(f"every source is too long for seq_len={cfg.seq_len}")
    answers = []
    for i in tqdm(range(0, len(kept), batch_size), desc="answer", leave=False, disable=not progress):
        out = generate(model, [ids for ids, _ in kept[i:i + batch_size]], **sampling)
        answers += [tok.decode(ids) for ids in out.tokens]
    refs = [t for _, t in kept]
    return {"examples": len(kept), "skipped": skipped,
            "exact_match": sum(h == r for h, r in zip(answers, refs)) / len(refs),
            "bleu": 100 * data.corpus_bleu(answers, refs), "chrf": 100 * data.chrf(answers, refs),
            "rouge_l": 100 * data.rouge_l(answers, refs), "answers": answers}


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
# The code version figures are measured at (bench.py's JSON, the race page's caption).
# ---------------------------------------------------------------------------------------


def code_version(out: str = "") -> dict:
    """The git commit this code is at, and whether the working tree differs from it (the
    figures of a dirty tree belong to no commit). `out`, the file the figures go to, does
    not count: a figures file committed by an earlier run would otherwise mark every rerun
    dirty."""
    root = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True)  # noqa: E731
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    changed = git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()  # "XY path"
    own = os.path.relpath(os.path.abspath(out), root) if out else None
    return {"commit": head.stdout.strip(), "dirty": any(line[3:] != own for line in changed)}


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
