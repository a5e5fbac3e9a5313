"""
E2D2: Encoder-Decoder Diffusion Language Models, in one readable file.

E2D2 (arXiv 2510.22852) is a masked ("absorbing state") discrete diffusion language
model that writes text block by block, like BD3-LM (arXiv 2503.09573). A sequence of
length L = K * B is cut into K blocks of B tokens, generated left to right; inside a
block, tokens start as [MASK] and are filled in over T denoising steps.

What E2D2 changes versus BD3-LM (the lines marked `# [E2D2]`, nothing else):
  1. The network is split in two: a big ENCODER (N_enc layers) reads the CLEAN tokens x_0
     (prompt + finished blocks); a small DECODER (N_dec << N_enc layers) reads the NOISY
     block x_t and attends to the encoder's output h.
  2. In every decoder layer the clean tokens' keys/values come from h (projected by that
     decoder layer: the "hidden" variant) or from an encoder layer ("shared_kv").
  3. Training needs no 2L-long input [x_0 ; x_t]: the encoder runs over the L clean tokens
     (the top half of BD3-LM's mask), the decoder over the L noisy tokens against 2L keys
     [h ; x_t] (the bottom half): N_enc + N_dec layer passes per token, not 2N.
  4. Sampling runs the encoder once per finished block and only the small decoder at each
     of the T denoising steps (BD3-LM runs its whole network T times per block).
Everything else (schedules, q(x_t | x_0), SUBS, the NELBO, the layers, the block loop)
is BD3-LM's; the baselines in baselines.py reuse it from here.

Reading order, bottom-up (each part uses only what comes before it): config -> noise
schedules -> masks -> q(x_t|x_0) -> SUBS + NELBO -> transformer pieces (RMSNorm, RoPE, KV
cache, attention, SwiGLU, Layer) -> the model base -> the E2D2 network -> its runners
(cached, and the uncached reference) -> the E2D2 model -> the block loop (sampling).

Shapes: b = batch, L = seq_len, B = block_len, K = L // B blocks, d = d_model,
H = n_heads, hd = d // H, V = vocab_size. Attention masks are boolean, True = "may attend".
"""

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# ---------------------------------------------------------------------------------------
# Config

SCHEDULES = ("linear", "cosine", "log", "exp")
DECODER_VARIANTS = ("hidden", "shared_kv")
PROMPT_ATTENTION = ("bidirectional", "block_causal")


@dataclass
class ModelConfig:
    # The inline comments are train.py's --help. Baselines (baselines.py): N = n_enc layers.
    model: str = "e2d2"  # which model: e2d2, or a baseline ar, mdlm, bd3lm
    vocab_size: int = 260  # V, the special tokens included (set from the tokenizer)
    pad_id: int = 256  # padding: never attended to, never a target (set from the tokenizer)
    eos_id: int = 258  # end of an answer (set from the tokenizer)
    mask_id: int = 259  # the absorbing [MASK] state (set from the tokenizer)
    seq_len: int = 32  # L, the longest sequence (prompt + answer); a multiple of block_len
    block_len: int = 4  # B, tokens per diffusion block (>= 1)
    d_model: int = 128  # width d; d / n_heads must be even (RoPE)
    n_heads: int = 4  # attention heads H
    n_enc: int = 4  # N_enc encoder layers (baselines: N layers)
    n_dec: int = 2  # N_dec decoder layers (e2d2 only)
    # "hidden": decoder layer i projects h with its own norm + K/V weights (the paper's
    # default); "shared_kv": it reuses encoder layer N_enc - N_dec + i's keys/values.
    decoder: str = "hidden"  # clean keys/values of the decoder: from h, or shared_kv
    schedule: str = "linear"  # noise schedule alpha(t)
    t_min: float = 1e-3  # training draws t ~ U[t_min, t_max]; 0 < t_min < t_max
    t_max: float = 1.0  # upper end of the training range of t, <= 1
    dropout: float = 0.0  # dropout probability, in [0, 1)
    rope_base: float = 10000.0  # RoPE frequency base
    # How training read a prompt, so that the sampler reads it the same way: seq2seq prompts
    # bidirectionally; plain text has none, so a sampling prompt is read block-causally.
    prompt_attention: str = "bidirectional"  # set from the data (seq2seq / text)

    def __post_init__(self):
        validate_config(self)


def validate_config(cfg: ModelConfig) -> None:
    """Raise a ValueError that says what is wrong, before torch sees a bad shape.
    (Whether cfg.model is a known model is checked by models.build_model.)"""
    problems = [f"{name} must be a positive integer, got {getattr(cfg, name)!r}"
                for name in ("vocab_size", "seq_len", "block_len", "d_model", "n_heads", "n_enc", "n_dec")
                if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1]
    if not problems:
        if cfg.seq_len % cfg.block_len != 0:
            problems.append(f"seq_len={cfg.seq_len} is not a multiple of block_len={cfg.block_len}")
        if cfg.d_model % cfg.n_heads != 0:
            problems.append(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        elif (cfg.d_model // cfg.n_heads) % 2 != 0:  # RoPE rotates pairs of dimensions
            problems.append(f"head size d_model/n_heads={cfg.d_model // cfg.n_heads} must be even (RoPE)")
        if cfg.model == "e2d2" and cfg.decoder == "shared_kv" and cfg.n_dec > cfg.n_enc:
            problems.append(f"decoder='shared_kv' gives each decoder layer an encoder layer's keys, so it "
                            f"needs n_dec <= n_enc (got n_dec={cfg.n_dec}, n_enc={cfg.n_enc})")
        problems += [f"{name}={getattr(cfg, name)} is outside the vocabulary" for name in ("pad_id", "eos_id", "mask_id")
                     if not 0 <= getattr(cfg, name) < cfg.vocab_size]
    for name, allowed in (("decoder", DECODER_VARIANTS), ("schedule", SCHEDULES),
                          ("prompt_attention", PROMPT_ATTENTION)):
        if getattr(cfg, name) not in allowed:
            problems.append(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if not 0.0 < cfg.t_min < cfg.t_max <= 1.0:  # t = 0 would give the weight 1/(1-alpha(0)) = inf
        problems.append(f"need 0 < t_min < t_max <= 1, got t_min={cfg.t_min}, t_max={cfg.t_max}")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {cfg.dropout}")
    if problems:
        raise ValueError("invalid ModelConfig: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------
# Noise schedules: alpha(t) = probability that a token is still clean at time t;
# alpha(0) = 1 (clean), alpha(1) ~ 0 (all [MASK]), alpha'(t) = d alpha / dt <= 0.

COSINE_EPS = 1e-3  # cosine keeps alpha(0) = 1 - eps, as in MDLM
EXP_POWER = 2  # "exp": mask probability t^p (the power schedule of MDLM/BD3-LM)


def noise_schedule(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha(t), alpha'(t)) of the named schedule, elementwise over t (any shape)."""
    if name == "linear":  # alpha = 1 - t
        return 1.0 - t, -torch.ones_like(t)
    if name == "cosine":  # alpha = (1 - eps) cos(pi t / 2)
        alpha = (1.0 - COSINE_EPS) * torch.cos(math.pi * t / 2)
        return alpha, -(1.0 - COSINE_EPS) * (math.pi / 2) * torch.sin(math.pi * t / 2)
    if name == "log":  # alpha = 1 - log(1 + t) / log 2
        return 1.0 - torch.log1p(t) / math.log(2.0), -1.0 / ((1.0 + t) * math.log(2.0))
    if name == "exp":  # alpha = 1 - t^p
        return 1.0 - t**EXP_POWER, -EXP_POWER * t ** (EXP_POWER - 1)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {SCHEDULES}")


def sample_t(batch: int, n_blocks: int, t_min: float, t_max: float, generator=None, device=None):
    """Training times, one per block: t_k ~ U[t_min, t_max] (BD3-LM's clipped schedule when
    narrower than [0, 1]). (b, K), float64: the weight divides by 1 - alpha(t), which
    float32 rounds badly for small t (exp schedule at t = 1e-3: a 6% error)."""
    u = torch.rand(batch, n_blocks, generator=generator, device=device)
    return t_min + (t_max - t_min) * u.double()


def loss_weight(alpha_t: torch.Tensor, alpha_prime_t: torch.Tensor) -> torch.Tensor:
    """NELBO weight of a masked token at time t: -alpha'(t) / (1 - alpha(t)). For the
    linear schedule this is 1/t: a block with few masks (t near 0) counts heavily."""
    return -alpha_prime_t / (1.0 - alpha_t)


# ---------------------------------------------------------------------------------------
# Attention masks. block(i) = i // B. Each mask is built by ONE function below, which
# training, the uncached sampler, the tests and the notebooks all call. A padding query
# would see no key (softmax of an empty row is NaN), so it sees itself; its output is unused.

def block_ids(length: int, block_len: int, device=None) -> torch.Tensor:
    """(length,) tensor with the block index of every position."""
    return torch.arange(length, device=device) // block_len


def _padding_rows_see_self(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace the row of every padding query in mask (b, L, L) by "itself only"."""
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    return torch.where(valid[:, :, None], mask, eye[None])


def encoder_mask(prompt_mask: torch.Tensor, valid: torch.Tensor, block_len: int) -> torch.Tensor:
    """Encoder self-attention over the clean sequence x_0: (b, L, L). Query i sees key j iff
    j is a real token and block(j) <= block(i) (block-causal), or j is a prompt token (the
    prompt is read bidirectionally)."""
    b, L = valid.shape
    blk = block_ids(L, block_len, valid.device)
    block_causal = blk[None, :, None] >= blk[None, None, :]  # (1, L, L): [i, j] = blk(j) <= blk(i)
    sees = (block_causal | prompt_mask[:, None, :]) & valid[:, None, :]  # (b, L, L)
    return _padding_rows_see_self(sees, valid)


def decoder_mask(valid: torch.Tensor, block_len: int) -> torch.Tensor:
    """Decoder attention: the L noisy queries x_t against the 2L keys [h ; x_t]: (b, L, 2L).
    A noisy query in block k sees clean h_j iff block(j) < k (offset block-causal: only
    FINISHED blocks) and noisy x_t,j iff block(j) == k (block-diagonal), never a padding
    key. Clean key j and noisy key j share RoPE position j."""
    b, L = valid.shape
    blk = block_ids(L, block_len, valid.device)
    offset_block_causal = blk[None, :, None] > blk[None, None, :]  # (1, L, L)
    block_diagonal = blk[None, :, None] == blk[None, None, :]  # (1, L, L)
    to_clean = offset_block_causal & valid[:, None, :] & valid[:, :, None]  # a padding query sees no clean key ...
    to_noisy = _padding_rows_see_self(block_diagonal & valid[:, None, :], valid)  # ... only itself
    return torch.cat([to_clean, to_noisy], dim=-1)  # (b, L, 2L)


def bd3lm_mask(prompt_mask: torch.Tensor, valid: torch.Tensor, block_len: int) -> torch.Tensor:
    """The picture E2D2 splits: BD3-LM (baselines.BD3LM) runs ONE network over [x_0 ; x_t]:
                    keys x_0 (clean)          keys x_t (noisy)
      x_0 queries   block-causal (+ prompt)   never                 <- encoder_mask
      x_t queries   offset block-causal       block-diagonal        <- decoder_mask
    (b, 2L, 2L). The clean rows never look at noisy keys, so E2D2 runs them alone (the
    encoder, L tokens) and only the noisy rows (the decoder) need the 2L keys."""
    enc = encoder_mask(prompt_mask, valid, block_len)  # (b, L, L)
    clean_rows = torch.cat([enc, torch.zeros_like(enc)], dim=-1)  # (b, L, 2L)
    return torch.cat([clean_rows, decoder_mask(valid, block_len)], dim=1)  # (b, 2L, 2L)


# ---------------------------------------------------------------------------------------
# Forward process q(x_t | x_0): one t per block; each target (non-prompt, non-padding)
# token of block k becomes [MASK] independently with probability 1 - alpha(t_k).

@dataclass
class Noised:
    x_t: torch.Tensor  # (b, L) noisy tokens
    masked: torch.Tensor  # (b, L) bool, True where x_t is [MASK]
    alpha_t: torch.Tensor  # (b, L) alpha(t_k) of each token's block
    alpha_prime_t: torch.Tensor  # (b, L) alpha'(t_k) of each token's block


def q_sample(x0: torch.Tensor, target_mask: torch.Tensor, t: torch.Tensor, block_len: int,
             mask_id: int, schedule: str = "linear", ensure_masked: bool = True,
             generator: Optional[torch.Generator] = None) -> Noised:
    """Draw x_t ~ q(x_t | x_0); t: (b, K). ensure_masked (training): a block with targets
    but no [MASK] would teach nothing, so m ~ U{1..n_targets} of its targets get masked."""
    b, L = x0.shape
    alpha_blk, alpha_prime_blk = noise_schedule(schedule, t)  # (b, K) each
    alpha_t = alpha_blk.repeat_interleave(block_len, dim=1)  # (b, L): block k's value on its B tokens
    alpha_prime_t = alpha_prime_blk.repeat_interleave(block_len, dim=1)  # (b, L)
    u = torch.rand(b, L, generator=generator, device=x0.device)
    masked = (u < 1.0 - alpha_t) & target_mask  # prompt and padding are never masked
    if ensure_masked:
        targets = rearrange(target_mask, "b (k B) -> b k B", B=block_len)
        got = rearrange(masked, "b (k B) -> b k B", B=block_len)
        n_targets = targets.sum(-1)  # (b, K)
        empty = (n_targets > 0) & (got.sum(-1) == 0)  # blocks that need a re-mask
        m = 1 + (torch.rand(n_targets.shape, generator=generator, device=x0.device) * n_targets).long()
        m = torch.minimum(m, n_targets.clamp(min=1))  # how many targets to mask
        # a random order of the targets inside each block (non-targets sort last)
        score = torch.rand(targets.shape, generator=generator, device=x0.device).masked_fill(~targets, 2.0)
        rank = score.argsort(-1).argsort(-1)  # rank of each position in its block
        remask = empty[..., None] & (rank < m[..., None]) & targets  # the m lowest ranks
        masked = masked | rearrange(remask, "b k B -> b (k B)")
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return Noised(x_t, masked, alpha_t, alpha_prime_t)


# ---------------------------------------------------------------------------------------
# SUBS parameterization and the loss (the NELBO of MDLM / BD3-LM).

def masked_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """What SUBS predicts at a [MASK] position: log p_theta(x_0 | x_t) (b, L, V), a softmax
    with zero mass on [MASK] (the clean data never contains it)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -math.inf)
    return F.log_softmax(logits, dim=-1)


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p_theta(x_0 | x_t) with SUBS (MDLM), (b, L, V): masked_log_probs at [MASK]; carry-over
    elsewhere (log p = 0 on x_t itself, -inf on the rest): unmasked tokens add exactly 0 to the loss."""
    log_p = masked_log_probs(logits, mask_id)
    carry = torch.where(torch.arange(logits.shape[-1], device=x_t.device) == x_t[..., None], 0.0, -math.inf)
    return torch.where((x_t != mask_id)[..., None], carry, log_p)


@dataclass
class Loss:
    loss: torch.Tensor  # what training minimises (masked_ce or nelbo, see diffusion_forward)
    nelbo: torch.Tensor  # sum_i w_k * (-log p(x0_i | x_t)) / n_targets
    masked_ce: torch.Tensor  # sum over masked targets of -log p, / n_targets (unweighted)
    n_targets: torch.Tensor  # number of target tokens the averages are taken over
    seq_nats: torch.Tensor  # (b,) per row: sum of w_k * (-log p) (AR: -log p), for the standard error
    scored_ids: torch.Tensor  # (b, L') the target token ids those nats are for, PAD elsewhere


def diffusion_loss(logits: torch.Tensor, x0: torch.Tensor, noised: Noised,
                   target_mask: torch.Tensor, mask_id: int, importance: Optional[torch.Tensor] = None):
    """NELBO per token = (1 / n_targets) * sum_{masked target i} w_k * (-log p(x0_i | x_t)),
    w_k = -alpha'(t_k) / (1 - alpha(t_k)) for i's block k (unmasked targets add 0: SUBS).
    importance (b, L): 1 / p(t_k) when t was drawn from a density p other than U[0, 1]
    (evaluation). Returns (nelbo, masked_ce, n_targets, seq_nats (b,))."""
    log_p = subs_log_probs(logits, noised.x_t, mask_id)  # (b, L, V)
    nll = -log_p.gather(-1, x0[..., None]).squeeze(-1)  # (b, L); 0 where x_t == x0
    w = loss_weight(noised.alpha_t, noised.alpha_prime_t)  # (b, L)
    if importance is not None:
        w = w * importance
    n_targets = target_mask.sum().clamp(min=1)
    zero = torch.zeros_like(nll)
    masked_ce = torch.where(target_mask, nll, zero).sum() / n_targets
    seq_nats = torch.where(target_mask, w * nll, zero).sum(1)  # (b,)
    return seq_nats.sum() / n_targets, masked_ce, n_targets, seq_nats


# ---------------------------------------------------------------------------------------
# Transformer pieces: RMSNorm, RoPE, the sampling KV cache, attention, SwiGLU and a
# pre-norm Layer. The encoder and the decoder are stacks of the same Layer.

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 even under bf16 autocast."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):  # torch's fused rms_norm: one call, not five small ops
        x_f = x.to(torch.promote_types(x.dtype, torch.float32))
        return F.rms_norm(x_f, (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_table(n: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin for positions 0..n-1, laid out for apply_rope: (n, hd) each, cos
    over every pair (c, c) and sin with the sign of each slot (-s, s). Pair i of the head
    dimension turns by position * base^(-2i / hd); float64 (large position x small frequency)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).double() / head_dim)  # (hd/2,)
    angles = torch.arange(n).double()[:, None] * inv_freq[None, :]  # (n, hd/2)
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every pair (x1, x2) of the head dimension: (x1 cos - x2 sin, x2 cos + x1 sin),
    written as x * (c, c) + (x2, x1) * (-s, s) (three ops, the same products and sums).
    x: (b, n, ..., hd), position on dim 1; cos, sin: (n, hd) from rope_table."""
    shape = (x.shape[1],) + (1,) * (x.dim() - 3) + (x.shape[-1],)  # (n, 1, ..., hd): broadcast
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x2, x1) in every pair
    return x * cos.view(shape) + swapped * sin.view(shape)


KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (b, H, n, hd), RoPE applied


class KVCache:
    """Keys/values of the clean tokens seen so far, per layer, for sampling. Static: each
    layer's buffers (b, H, max_len, hd) are allocated once and written in place (growing
    them by torch.cat would copy the whole cache at every call). [0, n) holds the n cached
    tokens; a call writes its new keys/values at [n, n + n_new) and attention reads
    [0, n + n_new) as one view. `add` keeps them; a noisy block's are overwritten next call.
    visible (b, max_len) is False at padding (left-padded prompts)."""

    def __init__(self, n_layers: int, batch: int, max_len: int, device):
        self.k, self.v = [None] * n_layers, [None] * n_layers  # allocated at the first write
        self.max_len, self.n = max_len, 0
        self.visible = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.padded = False  # does any cached key have to be hidden?

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Put new keys/values (b, H, n_new, hd) at [n, n + n_new) of `layer`; return the
        view [0, n + n_new) that attention reads."""
        if self.k[layer] is None:  # empty, not zeros: a position is written before it is read
            b, H, _, hd = k.shape
            self.k[layer], self.v[layer] = k.new_empty(b, H, self.max_len, hd), v.new_empty(b, H, self.max_len, hd)
        end = self.n + k.shape[2]
        self.k[layer][:, :, self.n:end], self.v[layer][:, :, self.n:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def add(self, tokens: torch.Tensor, pad_id: int, new_kv: Optional[list] = None):
        """New clean tokens (b, n_new) join the cache. Their keys/values are in place if the call
        that computed them wrote them; else new_kv (per layer) is written now (E2D2's decoder)."""
        for layer, (k, v) in enumerate(new_kv or []):
            self.write(layer, k, v)
        real = tokens != pad_id  # (b, n_new)
        self.visible[:, self.n:self.n + tokens.shape[1]] = real
        self.padded = self.padded or not bool(real.all())  # one host sync per block, not per step
        self.n += tokens.shape[1]

    def block_mask(self, n_new: int) -> Optional[torch.Tensor]:
        """The mask of a block's n_new queries: every real cached token and the whole block,
        the same for every query: (b, 1, n + n_new), or None (unmasked) if nothing is padding."""
        return self.visible[:, None, :self.n + n_new] if self.padded else None

    def keep(self, rows):
        """Drop the sequences that finished: rows is a bool (b,) or index tensor."""
        self.k = [None if k is None else k[rows] for k in self.k]
        self.v = [None if v is None else v[rows] for v in self.v]
        self.visible = self.visible[rows]


class Attention(nn.Module):
    """Multi-head attention (F.scaled_dot_product_attention, boolean mask or None). Keys/values
    from before this input come in `prefix`: (keys, values) put in front of its own (training:
    the E2D2 decoder's clean keys [h ; .]), or a function write(k, v): this layer's
    KVCache.write (sampling: written into the cache, everything cached up to them is read)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout, self.d = cfg.n_heads, cfg.dropout, cfg.d_model
        # one fused projection (one matmul per call, not two): rows [0, d) W_q, then W_k, W_v
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def project_kv(self, x: torch.Tensor, cos, sin) -> KV:
        """Keys (RoPE) and values of x (b, n, d), (b, H, n, hd) each: only the K/V rows of
        the fused matrix (the E2D2 decoder's clean stream needs no queries)."""
        kv = F.linear(x, self.qkv.weight[self.d:]).unflatten(-1, (2, self.n_heads, -1))  # (b, n, 2, H, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]  # (b, n, H, hd) views
        return apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, mask, prefix=None):
        """x: (b, n, d); mask: (b, n, n_prefix + n), or (b, 1, n_prefix + n) (the same for
        every query), or None. Returns the output (b, n, d) and this input's (keys, values)."""
        # plain views, not einops: under torch.compile einops' internals add ~120 guards that the
        # compiled code checks before every call (2-5% of a compiled generation, measured)
        qkv = self.qkv(x).unflatten(-1, (3, self.n_heads, -1))  # (b, n, 3, H, hd): a view
        qk = apply_rope(qkv[:, :, :2], cos, sin)  # queries and keys rotated in one go: (b, n, 2, H, hd)
        q, k, v = (t.transpose(1, 2) for t in (qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]))  # (b, H, n, hd) views
        keys, values = k, v
        if callable(prefix):  # sampling: written into the cache in place, read as one view
            keys, values = prefix(k, v)  # (b, H, n_cached + n, hd)
        elif prefix is not None:  # training: the clean keys/values in front
            keys, values = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=None if mask is None else mask[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)  # (b, H, n, hd)
        return self.out(y.transpose(1, 2).flatten(2)), (k, v)  # heads side by side: (b, n, H hd)


class SwiGLU(nn.Module):
    """The MLP of a Layer: down(silu(gate(x)) * up(x)), as in LLaMA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = 64 * math.ceil(8 * cfg.d_model / 3 / 64)  # ~ (8/3) d, rounded up to 64
        self.gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    """Pre-norm transformer layer: x + Attn(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model), SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, prefix=None):
        a, kv = self.attn(self.norm1(x), cos, sin, mask, prefix)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x))), kv

    def clean_kv(self, h, cos, sin) -> KV:  # [E2D2]
        """Keys/values of the clean stream h as THIS layer sees them, through its own input
        norm and K/V projection (the "hidden" variant). In BD3-LM each layer's clean keys
        come from its own clean hidden state instead."""
        return self.attn.project_kv(self.norm1(h), cos, sin)


# ---------------------------------------------------------------------------------------
# What every model shares (E2D2 here, the baselines in baselines.py): a token embedding
# tied to the output head, RoPE, weight init, `run` (a stack of Layers), the training step.

class TokenModel(nn.Module):
    """Base of every model. A subclass adds its layers and defines logits(...) (its training
    forward), forward(x0, prompt_mask, generator, train_loss, t_draw) -> Loss, and
    make_runner(prompt, use_cache, max_new_tokens) -> the runner generate() drives."""

    exact_likelihood = False  # True for a model whose loss is an exact NLL (AR)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model)  # final norm before the head
        self.drop = nn.Dropout(cfg.dropout)
        # RoPE's cos/sin of every position, once (float64, cast at the call; not saved). 2 seq_len
        # positions: MDLM's batched sampler lays rows with different prompt lengths side by side.
        cos, sin = rope_table(2 * cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (2 seq_len, hd)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self):
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * depth)
        depth = sum(isinstance(m, Layer) for m in self.modules())
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual_out = name.endswith(("out.weight", "down.weight"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth) if residual_out else 0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def rope(self, positions):
        """cos, sin (n, hd) of positions: a slice (a free view) or an index tensor (n,)."""
        dtype = self.embed.weight.dtype
        return self.rope_cos[positions].to(dtype), self.rope_sin[positions].to(dtype)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """Final norm and output head tied to the token embedding: (b, n, d) -> (b, n, V)."""
        return F.linear(self.norm(z), self.embed.weight)

    def run(self, layers, x, positions, mask, prefix=None):
        """x (b, n, d) through `layers` (mask: see Attention.forward). prefix: None; a list, item
        i the keys/values layer i attends to in front of its own (training: the E2D2 decoder's
        clean keys); or a KVCache (sampling) that layer i reads and extends. Returns x and each
        layer's own (keys, values) of this input."""
        cos, sin = self.rope(positions)
        new_kv = []
        for i, layer in enumerate(layers):
            if isinstance(prefix, KVCache):  # sampling: layer i's writer into the cache
                before = functools.partial(prefix.write, i)
            else:  # training: layer i's clean keys/values, or nothing
                before = None if prefix is None else prefix[i]
            x, kv = layer(x, cos, sin, mask, before)
            new_kv.append(kv)
        return x, new_kv


def check_length(cfg: ModelConfig, L: int, block_len: int) -> None:
    """Clear errors for a training input the model cannot take."""
    if L % block_len != 0:
        raise ValueError(f"sequence length {L} is not a multiple of block_len={block_len}")
    if L > cfg.seq_len:
        raise ValueError(f"sequence length {L} exceeds the model's seq_len={cfg.seq_len}")


def diffusion_forward(model, x0, prompt_mask, block_len, generator, train_loss, t_draw=None) -> Loss:
    """The training step of E2D2, BD3-LM and MDLM: one t per block, x_t ~ q(x_t | x_0),
    the logits of every noisy token in ONE model.logits call, and the losses. train_loss:
    what `loss` is, "masked_ce" (the authors' objective) or "nelbo" (the bound itself).
    t_draw (evaluation, models.eval_nelbo): a function (b, K, generator, device) -> t,
    1 / p(t) that draws t over all of [0, 1]; x_t then comes from q exactly (no re-masking
    of empty blocks, which would change the distribution the bound is an expectation over)."""
    cfg = model.cfg
    if train_loss not in ("masked_ce", "nelbo"):
        raise ValueError(f"train_loss must be 'masked_ce' or 'nelbo', got {train_loss!r}")
    b, L = x0.shape
    check_length(cfg, L, block_len)
    target_mask = (x0 != cfg.pad_id) & ~prompt_mask  # what the loss is averaged over
    if t_draw is None:  # training: (b, K)
        t, importance = sample_t(b, L // block_len, cfg.t_min, cfg.t_max, generator, x0.device), None
    else:  # evaluation: (b, K) each, then 1 / p(t) on every token (b, L)
        t, importance = t_draw(b, L // block_len, generator, x0.device)
        importance = importance.repeat_interleave(block_len, dim=1)
    noised = q_sample(x0, target_mask, t, block_len, cfg.mask_id, cfg.schedule,
                      ensure_masked=t_draw is None, generator=generator)
    logits = model.logits(x0, noised.x_t, prompt_mask)  # (b, L, V)
    nelbo, masked_ce, n, seq_nats = diffusion_loss(logits, x0, noised, target_mask, cfg.mask_id, importance)
    scored = torch.where(target_mask, x0, cfg.pad_id)  # which tokens the nats are for
    return Loss(masked_ce if train_loss == "masked_ce" else nelbo, nelbo, masked_ce, n, seq_nats, scored)


# ---------------------------------------------------------------------------------------
# The E2D2 network: a token embedding shared by an encoder stack over clean tokens and a
# decoder stack over noisy tokens.

class E2D2Network(TokenModel):
    """Encode the clean tokens, decode the noisy ones. The E2D2 class at the end of the
    file adds the sampler's hook (make_runner), once the runners exist."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)  # self.embed is shared by encoder and decoder
        self.encoder = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_enc))  # [E2D2] N_enc layers on x_0
        self.decoder = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_dec))  # [E2D2] N_dec layers on x_t
        self.enc_norm = RMSNorm(cfg.d_model)  # [E2D2] h = enc_norm(last encoder hidden state)
        self.init_weights()

    def encode(self, x0, positions, mask, cache: Optional[KVCache] = None):
        """The N_enc encoder layers over clean tokens x0 (b, n); cache: the sampler's encoder
        KVCache (the new keys are written into it) or None. Returns h = enc_norm(hidden)
        (b, n, d) and this call's per-layer (k, v)."""
        x, new_kv = self.run(self.encoder, self.drop(self.embed(x0)), positions, mask, cache)
        return self.enc_norm(x), new_kv

    def clean_kv(self, h, positions, enc_kv) -> list:  # [E2D2]
        """Per decoder layer l, the clean tokens' keys/values (N_dec KVs): "hidden" projects
        h with layer l's own norm and K/V weights; "shared_kv" reuses encoder layer
        N_enc - N_dec + l's (no projection at all)."""
        if self.cfg.decoder == "shared_kv":
            return list(enc_kv[len(enc_kv) - self.cfg.n_dec:])
        cos, sin = self.rope(positions)
        return [layer.clean_kv(h, cos, sin) for layer in self.decoder]

    def decode(self, x_t, positions, mask, clean) -> torch.Tensor:
        """The N_dec decoder layers over noisy tokens x_t (b, n): queries from the noisy stream,
        keys/values [clean[l] ; the noisy stream's own]. clean: N_dec KVs (training) or the
        sampler's decoder KVCache (noisy keys go to its scratch, never kept). Logits (b, n, V)."""
        z, _ = self.run(self.decoder, self.drop(self.embed(x_t)), positions, mask, clean)  # [E2D2]
        return self.head(z)

    def logits(self, x0, x_t, prompt_mask) -> torch.Tensor:
        """The training forward, all blocks in one pass (b, L, V): the encoder reads x_0 (L
        tokens), the decoder x_t (L queries, 2L keys); BD3-LM runs N layers over 2L tokens."""
        valid = x0 != self.cfg.pad_id
        positions = slice(0, x0.shape[1])  # x_0,j and x_t,j share position j
        enc_mask = encoder_mask(prompt_mask, valid, self.cfg.block_len)  # (b, L, L)
        h, enc_kv = self.encode(x0, positions, enc_mask)  # [E2D2] N_enc layers over L clean tokens
        clean = self.clean_kv(h, positions, enc_kv)  # [E2D2] per decoder layer, L keys each
        dec_mask = decoder_mask(valid, self.cfg.block_len)  # (b, L, 2L)
        return self.decode(x_t, positions, dec_mask, clean)  # [E2D2] N_dec layers, L queries, 2L keys

    def forward(self, x0, prompt_mask, generator=None, train_loss: str = "masked_ce", t_draw=None) -> Loss:
        """x0: (b, L) clean tokens (PAD = padding); prompt_mask: (b, L) bool. Noises x0,
        runs encoder + decoder once, returns the losses (see diffusion_forward)."""
        return diffusion_forward(self, x0, prompt_mask, self.cfg.block_len, generator, train_loss, t_draw)


# ---------------------------------------------------------------------------------------
# Runners. The block loop (generate, at the end) is the same for every model; the model
# hands it a "runner" that hides how logits are computed:
#   runner.block_len        B, the length of the blocks the loop denoises
#   runner.steps            None (the caller's T), or a fixed T the model needs
#   runner.canvas           None, or (b,) how many positions each row generates (MDLM)
#   runner.logits(x_block)  (b, B, V) logits of the noisy block (one network call)
#   runner.commit(block)    the finished clean block joins the context
#   runner.keep(rows)       drop finished sequences from the batch
#   runner.encoder_calls, runner.decoder_calls   passes over clean / noisy tokens
# CachedE2D2 is the fast one; Recompute re-runs the training forward over everything at
# every step (no cache): the reference every cached runner must match exactly.

def sampler_prompt_mask(cfg: ModelConfig, prompt: torch.Tensor) -> torch.Tensor:
    """The prompt_mask a (left-padded) prompt (b, P') is read with, as in training: every
    real token (seq2seq, "bidirectional"), or none (plain text: read block-causally)."""
    if cfg.prompt_attention == "bidirectional":
        return prompt != cfg.pad_id
    return torch.zeros_like(prompt, dtype=torch.bool)


class CachedE2D2:
    """E2D2 sampling with two caches: enc (keys/values of every clean token in each encoder
    layer, so a finished block is encoded alone, B queries against the cache) and dec (the
    keys/values of h in each decoder layer, computed once per clean token and reused at
    every denoising step)."""

    steps = canvas = None  # any number of steps per block; every row fills B

    def __init__(self, model: E2D2Network, prompt: torch.Tensor):
        self.model, cfg = model, model.cfg
        self.block_len = cfg.block_len
        self.enc = KVCache(cfg.n_enc, prompt.shape[0], cfg.seq_len, prompt.device)
        self.dec = KVCache(cfg.n_dec, prompt.shape[0], cfg.seq_len, prompt.device)  # [E2D2]
        self.encoder_calls = self.decoder_calls = 0
        if prompt.shape[1] > 0:  # the prompt is read as in training
            mask = encoder_mask(sampler_prompt_mask(cfg, prompt), prompt != cfg.pad_id, cfg.block_len)
            self._encode(prompt, mask)

    def _encode(self, tokens, mask):
        """Encode new clean tokens (b, n) against the encoder cache; extend both caches."""
        n0 = self.enc.n
        positions = slice(n0, n0 + tokens.shape[1])  # RoPE continues after the cache
        h, new_kv = self.model.encode(tokens, positions, mask, self.enc)  # K/V written in place
        self.enc.add(tokens, self.model.cfg.pad_id)
        clean = self.model.clean_kv(h, positions, new_kv)  # [E2D2] projected ONCE per block
        self.dec.add(tokens, self.model.cfg.pad_id, clean)  # [E2D2]
        self.encoder_calls += 1

    def logits(self, x_block):
        """Only the decoder runs: B noisy queries against [cached clean keys ; own keys]."""
        n0 = self.dec.n
        self.decoder_calls += 1
        return self.model.decode(x_block, slice(n0, n0 + x_block.shape[1]),  # [E2D2]
                                 self.dec.block_mask(x_block.shape[1]), self.dec)  # (b, B, V)

    def commit(self, block):
        """A finished block (b, B) goes through the encoder once (BD3-LM: all N layers)."""
        self._encode(block, self.enc.block_mask(block.shape[1]))

    def keep(self, rows):
        self.enc.keep(rows)
        self.dec.keep(rows)


class Recompute:
    """No cache: every step re-runs the training forward (model.logits) on [context ; noisy
    block] and keeps the block's logits. E2D2's encoder and BD3-LM's clean stream are
    block-causal, so what sits in the block's slot of x0 cannot reach its logits: x_t goes
    there (MDLM reads only x_t). reencodes: each call counts as an encoder call too
    (E2D2 re-runs its encoder at every step). canvas (b,): see the runner interface."""

    steps = None

    def __init__(self, model, prompt: torch.Tensor, block_len: int, reencodes: bool, canvas=None):
        self.model, self.context, self.n_prompt = model, prompt, prompt.shape[1]
        self.block_len, self.reencodes, self.canvas = block_len, reencodes, canvas
        self.prompt_mask = sampler_prompt_mask(model.cfg, prompt)  # (b, P'): as in training
        self.encoder_calls = self.decoder_calls = 0

    def logits(self, x_block):
        x = torch.cat([self.context, x_block], dim=1)  # (b, n + B)
        prompt_mask = torch.zeros_like(x, dtype=torch.bool)
        prompt_mask[:, : self.n_prompt] = self.prompt_mask
        self.decoder_calls += 1
        self.encoder_calls += self.reencodes
        return self.model.logits(x, x, prompt_mask)[:, -x_block.shape[1]:]  # (b, B, V)

    def commit(self, block):
        self.context = torch.cat([self.context, block], dim=1)

    def keep(self, rows):
        self.context, self.prompt_mask = self.context[rows], self.prompt_mask[rows]


class E2D2(E2D2Network):
    """The E2D2 model: the network, plus the runner it hands the sampler."""

    def make_runner(self, prompt, use_cache: bool, max_new_tokens=None):
        if use_cache:
            return CachedE2D2(self, prompt)
        return Recompute(self, prompt, self.cfg.block_len, reencodes=True)


# ---------------------------------------------------------------------------------------
# Sampling, block by block, with whatever runner the model hands the loop.

@dataclass
class SampleOutput:
    tokens: list  # per sequence: the generated token ids, cut before the first [EOS]
    finished: list  # per sequence: True if it produced [EOS]
    network_calls: int  # model calls that produced logits (NFE)
    encoder_calls: int  # passes over clean tokens: E2D2's encoder, BD3-LM's clean blocks
    decoder_calls: int  # passes over noisy tokens (E2D2: the decoder stack)
    new_tokens: int  # tokens generated, summed over the batch (up to and with [EOS])


def left_pad(prompts: list, block_len: int, pad_id: int, device=None) -> torch.Tensor:
    """Left-pad prompts to (b, P'), P' = ceil(longest / B) * B, so every answer starts at
    the same block boundary. Training pads each row to its own boundary; the extra padding
    changes nothing (padding is never attended to, RoPE sees relative positions only)."""
    n = max((len(p) for p in prompts), default=0)
    width = block_len * math.ceil(n / block_len)
    out = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            out[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    return out


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filtering of probs (..., V): keep the most likely tokens whose probabilities
    add up to top_p (a token is kept iff the mass ranked above it is < top_p, so the top
    one always is), zero the rest, renormalise. top_p = 1 keeps every token."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (..., V) each
    keep_sorted = sorted_p.cumsum(-1) - sorted_p < top_p  # mass of the tokens ranked above
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to token order
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(-1, keepdim=True)


@functools.lru_cache(maxsize=None)
def alpha_at(schedule: str, t: float) -> float:
    """alpha(t) as a float, memoised: every block asks for the same T + 1 grid times, so
    after the first block a step runs no tensor op (and no .item(), a GPU host sync)."""
    return noise_schedule(schedule, torch.tensor(t, dtype=torch.float64))[0].item()


def denoise_step(logits, x, t, s, cfg: ModelConfig, strategy, temperature,
                 confidence_threshold, generator, final: bool, n_positions=None,
                 top_p: float = 1.0) -> torch.Tensor:
    """One reverse step t -> s (s < t) on a block x (b, B); returns x_s (b, B). x_theta is
    the argmax of p_theta (temperature=0) or a sample of softmax(logits / temperature)
    (top_p < 1: of its nucleus). Which [MASK] it fills: strategy "remask" keeps the most
    confident and re-masks the rest, so that floor((1 - alpha_s) n) stay masked ("predict
    and remask"); "ancestral" draws x_s ~ q(x_s | x_t, x_theta); confidence_threshold also
    reveals every [MASK] more likely than it. Decoded tokens never change (SUBS carry-over).
    n_positions (b,): the n positions each row generates (default B; MDLM's canvases)."""
    is_mask = x == cfg.mask_id  # (b, B)
    # Only [MASK] positions need SUBS probabilities: the final torch.where keeps decoded
    # tokens anyway, so subs_log_probs' carry-over one-hot (b, B, V) is never built here.
    probs = masked_log_probs(logits if temperature == 0 else logits / temperature, cfg.mask_id).exp()
    probs = nucleus(probs, top_p)  # (b, B, V)
    if temperature == 0:  # x_theta: the argmax, or a sample of probs
        pred = probs.argmax(-1)  # (b, B)
    else:
        pred = torch.multinomial(rearrange(probs, "b n V -> (b n) V"), 1, generator=generator).view(x.shape)
    confidence = probs.gather(-1, pred[..., None]).squeeze(-1)  # p(x_theta): (b, B)
    alpha_t, alpha_s = alpha_at(cfg.schedule, t), alpha_at(cfg.schedule, s)
    if final:  # the last step reveals every remaining [MASK]
        reveal = is_mask
    elif strategy == "ancestral":  # q(x_s | x_t, x_theta): reveal w.p. (alpha_s - alpha_t) / (1 - alpha_t)
        u = torch.rand(x.shape, generator=generator, device=x.device)
        reveal = is_mask & (u < (alpha_s - alpha_t) / (1.0 - alpha_t))
    else:  # remask: the least confident stay masked, but one [MASK] at least is revealed
        n = torch.full((x.shape[0],), x.shape[1], device=x.device) if n_positions is None else n_positions
        n_stay = torch.floor((1.0 - alpha_s) * n.double() + 1e-6).long()  # (b,)
        n_stay = torch.minimum(torch.clamp(is_mask.sum(1) - 1, min=0), n_stay)  # (b,)
        conf = confidence.masked_fill(~is_mask, math.inf)  # decoded tokens never re-mask
        rank = conf.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = least confident
        reveal = is_mask & (rank >= n_stay[:, None])
    if confidence_threshold is not None:  # Fast-dLLM style: every confident [MASK] too
        reveal = reveal | (is_mask & (confidence > confidence_threshold))
    return torch.where(reveal, pred, x)


@torch.no_grad()
def generate(model: TokenModel, prompts: list, max_new_tokens: Optional[int] = None,
             steps: Optional[int] = None, strategy: str = "remask", temperature: float = 0.0,
             top_p: float = 1.0, confidence_threshold: Optional[float] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None, on_step: Optional[Callable] = None,
             stop_at_eos: bool = True) -> SampleOutput:
    """Generate answers for a batch of prompts (lists of token ids, any lengths).

    Block by block (the runner sets B: E2D2 block_len; MDLM the whole answer, each row its
    own canvas; AR one token), each block starting all [MASK]; T = `steps` (default B)
    steps per block, t from 1 down to 0, each a denoise_step (strategy, temperature, top_p,
    confidence_threshold: see there) on the runner's logits of the block; an unchanged
    block reuses the last logits (no call). A finished block is committed (encoded,
    cached); a row stops after the block where it wrote [EOS] (stop_at_eos).
    on_step(block, step, rows, x_block) runs after every step (for --show). No timing
    here: callers that measure speed time around this call."""
    cfg = model.cfg
    if strategy not in ("remask", "ancestral"):
        raise ValueError(f"strategy must be 'remask' or 'ancestral', got {strategy!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    device = model.embed.weight.device
    prompt = left_pad(prompts, cfg.block_len, cfg.pad_id, device)  # (b, P')
    room = cfg.seq_len - prompt.shape[1]  # positions left for the answer
    if room < cfg.block_len:
        raise ValueError(f"prompt of {max(len(p) for p in prompts)} tokens ({prompt.shape[1]} after aligning "
                         f"to blocks of {cfg.block_len}) leaves no room to generate within seq_len={cfg.seq_len}")
    if max_new_tokens is not None and not 1 <= max_new_tokens <= room:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be between 1 and {room} (seq_len="
                         f"{cfg.seq_len} minus the {prompt.shape[1]} aligned prompt positions)")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    was_training = model.training
    model.eval()
    runner = model.make_runner(prompt, use_cache, max_new_tokens)  # the model's own runner
    B = runner.block_len
    T = runner.steps or steps or B  # default: T = B steps per block, as in the paper
    b = prompt.shape[0]
    # positions per row: max_new_tokens (default: all the room), or the runner's canvas
    canvas = torch.full((b,), max_new_tokens or room, device=device) if runner.canvas is None else runner.canvas
    n_blocks = math.ceil(int(canvas.max()) / B)
    out = torch.full((b, n_blocks * B), cfg.pad_id, dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)  # the sequences still generating
    network_calls = 0
    grid = torch.linspace(1.0, 0.0, T + 1, dtype=torch.float64).tolist()  # t_0 = 1 > ... > t_T = 0
    # "remask" without a threshold reveals exactly (masks left - n_stay) per step when every
    # row fills B positions, so the host knows how many [MASK] are left without reading x:
    # no host sync in the step loop. Otherwise (ancestral, a threshold, a canvas) x is read.
    counted = strategy == "remask" and confidence_threshold is None and runner.canvas is None
    for k in range(n_blocks):
        x = torch.full((len(rows), B), cfg.mask_id, dtype=torch.long, device=device)  # all [MASK]
        n_positions = None  # every row fills all B positions, except rows with a canvas: PAD after it
        if runner.canvas is not None:
            n_positions = canvas[rows]
            x = torch.where(torch.arange(B, device=device) < n_positions[:, None], x, cfg.pad_id)
        last_x, last_logits = None, None
        masks_left = B  # counted: [MASK] left in every row
        for i in range(T):
            complete = (masks_left == 0) if counted else not (x == cfg.mask_id).any()
            if complete:  # no [MASK] left in the block
                break
            # an unchanged block needs no call (the same logits); counted: each step changes it
            if counted or last_x is None or not torch.equal(x, last_x):
                last_logits, last_x = runner.logits(x), x  # (b, B, V)
                network_calls += 1
            x = denoise_step(last_logits, x, grid[i], grid[i + 1], cfg, strategy, temperature,
                             confidence_threshold, generator, final=(i == T - 1), n_positions=n_positions,
                             top_p=top_p)
            if counted:  # denoise_step's n_stay: floor((1 - alpha_s) B), at most masks - 1, 0 at the end
                n_stay = math.floor((1.0 - alpha_at(cfg.schedule, grid[i + 1])) * B + 1e-6)
                masks_left = 0 if i == T - 1 else min(max(masks_left - 1, 0), n_stay)
            if on_step is not None:
                on_step(k, i, rows, x)
        out[rows, k * B:(k + 1) * B] = x
        done = (x == cfg.eos_id).any(dim=1) if stop_at_eos else torch.zeros_like(rows, dtype=torch.bool)
        if k == n_blocks - 1 or done.all():
            break
        runner.commit(x)  # the finished block becomes clean context
        if done.any():  # per-sequence stop at [EOS]
            runner.keep(~done)
            rows = rows[~done]
    if was_training:
        model.train()
    # cut every row at its first [EOS] (the rest of that block is [EOS] or noise)
    answers = [row[:n] for row, n in zip(out.tolist(), canvas.tolist())]
    finished = [stop_at_eos and cfg.eos_id in row for row in answers]
    tokens = [row[:row.index(cfg.eos_id)] if f else row for row, f in zip(answers, finished)]
    new = sum(len(row) + f for row, f in zip(tokens, finished))  # [EOS] counts as generated
    return SampleOutput(tokens, finished, network_calls, runner.encoder_calls, runner.decoder_calls, new)
