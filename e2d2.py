"""
E2D2: Encoder-Decoder Diffusion Language Models, in one readable file.

E2D2 (arXiv 2510.22852) is a masked ("absorbing state") discrete diffusion language
model that writes text block by block, like BD3-LM (arXiv 2503.09573). A sequence of
length L = K * B is cut into K blocks of B tokens, generated left to right; inside a
block, tokens start as [MASK] and are filled in over T denoising steps.

What E2D2 changes versus BD3-LM is marked `# [E2D2]` where it happens (a marked `def` or
`class` line: all of it):
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
Everything unmarked (schedules, q(x_t | x_0), SUBS, the loss, the masks, the layers, the
KV cache, the block loop) is shared with BD3-LM (the sampler's strategies with MDLM, BD3-LM
and Fast-dLLM); baselines.py builds AR, MDLM and BD3-LM from it.

Read it top to bottom: 1. config, 2. noise schedule and q(x_t | x_0), 3. SUBS, the loss
and the training step, 4. the two masks, 5. the transformer layers, 6. the E2D2 network,
7. the cached sampler, 8. the block loop. Each part uses only what came before it, with
two exceptions: ModelConfig (section 1) checks its `schedule` against SCHEDULES (section
2), so that a bad name stops a run before any tensor exists; and the training step
(section 3) calls a network's `logits(x_0, x_t, bidirectional)`, which section 6 defines
for E2D2 (baselines.py for the others). A docstring may name what a later section adds.

Words used one way throughout (the README, `sample.py --show` and the notebooks too):
  block k     positions [k B, (k + 1) B) of the WHOLE sequence, the prompt's blocks
              included: with a prompt of 2 blocks, the first answer block is block 2.
  valid       a real token: not padding. A real query never attends to a padding key
              (a padding query attends to itself only; its output is unused).
  bidirectional  (encoder_mask's, bd3lm_mask's and every network's logits' argument) the
              tokens every query may read whatever its block: in training the prompt of
              a seq2seq example (prompt_mask), none in plain text.
  reveal      a denoising step replaces a [MASK] by a token (elsewhere called decoding or
              unmasking; here `decode` is only the decoder stack's method).
  finish_block  a finished (fully revealed) block joins the clean context: E2D2's cached
              sampler runs the encoder over it once and caches what its layers see of it.
  stop        a sequence stops after the block in which it wrote [EOS].
  # [speed]   marks a line written for speed rather than in its plainest form; the plain
              form is said beside it (measurements, where taken: docs/benchmarks.md).

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
# 1. Config
#
# The paper's two decoders (say which one you mean; the rest of the project does):
#   from scratch (the default here): decoder="hidden", its own N_dec layers (untied); each
#     decoder layer projects the encoder's output h into its own keys/values.
#   from a pretrained model (the paper's fine-tuning of an AR LM; train.py --init_from from
#     an AR checkpoint): decoder="shared_kv", tie_decoder=True, decoder_layers="top": the
#     decoder IS the top N_dec layers of the encoder, and decoder layer j reads the
#     keys/values of its own encoder layer, as a layer of the AR model read its own depth.

DECODER_VARIANTS = ("hidden", "shared_kv")
DECODER_LAYERS = ("top", "bottom")
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
    n_dec: int = 2  # [E2D2] N_dec decoder layers
    decoder: str = "hidden"  # [E2D2] the decoder's clean keys/values: hidden (from h) or shared_kv (encoder layers')
    decoder_layers: str = "top"  # [E2D2] decoder layer j pairs with encoder layer N_enc - N_dec + j (top) or j (bottom)
    tie_decoder: bool = False  # [E2D2] decoder layer j IS its paired encoder layer (shared weights, no new parameters)
    schedule: str = "linear"  # noise schedule alpha(t), one of SCHEDULES (section 2)
    t_min: float = 1e-3  # training draws t ~ U[t_min, t_max]; 0 < t_min < t_max
    t_max: float = 1.0  # upper end of the training range of t, <= 1
    dropout: float = 0.0  # dropout probability, in [0, 1)
    rope_base: float = 10000.0  # RoPE frequency base
    prompt_attention: str = "bidirectional"  # how training read prompts (and so the sampler), set by the data

    def __post_init__(self):
        """Raise a ValueError that says what is wrong, before torch sees a bad shape.
        (Whether cfg.model is a known model is checked by models.build_model.)"""
        problems = [f"{name} must be a positive integer, got {getattr(self, name)!r}"
                    for name in ("vocab_size", "seq_len", "block_len", "d_model", "n_heads", "n_enc", "n_dec")
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if not problems:
            if self.seq_len % self.block_len != 0:
                problems.append(f"seq_len={self.seq_len} is not a multiple of block_len={self.block_len}")
            if self.d_model % self.n_heads != 0:
                problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            elif (self.d_model // self.n_heads) % 2 != 0:  # RoPE rotates pairs of dimensions
                problems.append(f"head size d_model/n_heads={self.d_model // self.n_heads} must be even (RoPE)")
            if self.model == "e2d2" and (self.decoder == "shared_kv" or self.tie_decoder) and self.n_dec > self.n_enc:
                problems.append(f"decoder={self.decoder!r}, tie_decoder={self.tie_decoder} pairs each decoder layer "
                                f"with an encoder layer: needs n_dec <= n_enc ({self.n_dec} > {self.n_enc})")  # [E2D2]
            problems += [f"{name}={getattr(self, name)} is outside the vocabulary"
                         for name in ("pad_id", "eos_id", "mask_id") if not 0 <= getattr(self, name) < self.vocab_size]
        problems += [f"{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}" for name, allowed in (
            ("decoder", DECODER_VARIANTS), ("decoder_layers", DECODER_LAYERS), ("tie_decoder", (False, True)),
            ("schedule", SCHEDULES), ("prompt_attention", PROMPT_ATTENTION)) if getattr(self, name) not in allowed]
        if not 0.0 < self.t_min < self.t_max <= 1.0:  # t = 0 would give the weight 1/(1-alpha(0)) = inf
            problems.append(f"need 0 < t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------
# 2. Noise schedule and the forward process q(x_t | x_0).
# alpha(t) = the probability that a token is still clean at time t: it falls from about 1
# at t = 0 (clean) to about 0 at t = 1 (all [MASK]); alpha'(t) = d alpha / dt <= 0.

COSINE_EPS = 1e-3  # cosine: alpha(0) = 1 - eps, as in MDLM
POWER = 2  # "power": mask probability t^p (the authors' code calls this schedule "exp")
# Every schedule, name -> t -> (alpha(t), alpha'(t)) elementwise. A new schedule is one entry
# here: the flags, the tests and the evaluation (models.sample_t_eval) read this dict.
SCHEDULES = {
    "linear": lambda t: (1.0 - t, -torch.ones_like(t)),  # alpha = 1 - t
    "cosine": lambda t: ((1.0 - COSINE_EPS) * torch.cos(math.pi * t / 2),  # alpha = (1 - eps) cos(pi t / 2)
                         -(1.0 - COSINE_EPS) * (math.pi / 2) * torch.sin(math.pi * t / 2)),
    "log": lambda t: (1.0 - torch.log1p(t) / math.log(2.0), -1.0 / ((1.0 + t) * math.log(2.0))),  # 1 - log2(1 + t)
    "power": lambda t: (1.0 - t**POWER, -POWER * t ** (POWER - 1)),  # alpha = 1 - t^p
}


def noise_schedule(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha(t), alpha'(t)) of the named schedule, elementwise over t (any shape)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {tuple(SCHEDULES)}")
    return SCHEDULES[name](t)


def sample_t(batch: int, n_blocks: int, t_min: float, t_max: float, generator=None, device=None):
    """Training times, one per block: t_k ~ U[t_min, t_max] (BD3-LM's clipped schedule), (b, K),
    float64: the weight's 1 - alpha(t) is 6% off in float32 (power schedule, t = 1e-3)."""
    u = torch.rand(batch, n_blocks, generator=generator, device=device)
    return t_min + (t_max - t_min) * u.double()


@dataclass
class Noised:
    x_t: torch.Tensor  # (b, L) noisy tokens
    masked: torch.Tensor  # (b, L) bool, True where x_t is [MASK]
    alpha_t: torch.Tensor  # (b, L) alpha(t_k) of each token's block
    alpha_prime_t: torch.Tensor  # (b, L) alpha'(t_k) of each token's block


def q_sample(x0: torch.Tensor, target_mask: torch.Tensor, t: torch.Tensor, block_len: int,
             mask_id: int, schedule: str = "linear", ensure_masked: bool = True,
             generator: Optional[torch.Generator] = None) -> Noised:
    """Draw x_t ~ q(x_t | x_0), t: (b, K). Each target token (not prompt, not padding) of block
    k becomes [MASK] independently with probability 1 - alpha(t_k). ensure_masked (training):
    a block with targets but no [MASK] teaches nothing: m ~ U{1..n_targets} of them get masked."""
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
        m = torch.minimum(m, n_targets.clamp(min=1))  # how many targets to mask: m ~ U{1..n_targets}
        # a random order of the targets inside each block (non-targets sort last)
        score = torch.rand(targets.shape, generator=generator, device=x0.device).masked_fill(~targets, 2.0)
        rank = score.argsort(-1).argsort(-1)  # rank of each position in its block
        forced = empty[..., None] & (rank < m[..., None]) & targets  # the m lowest ranks
        masked = masked | rearrange(forced, "b k B -> b (k B)")
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return Noised(x_t, masked, alpha_t, alpha_prime_t)


# ---------------------------------------------------------------------------------------
# 3. SUBS, the loss, and the training step (noise x_0, one network call, the loss).
# SUBS is MDLM's "SUBStitution" parameterization: two substitutions turn the network's
# output into p_theta(x_0 | x_t). (a) Zero masking probability: logits[MASK] = -inf (clean
# data never holds [MASK]). (b) Carry-over unmasking: where x_t is not [MASK] the prediction
# IS x_t, so only masked tokens add to the loss. The NELBO of a block at time t is then a
# weighted cross-entropy over its masked tokens: w(t) * -log p_theta(x0_i | x_t), with
# w(t) = -alpha'(t) / (1 - alpha(t)) (MDLM / BD3-LM).
# Why training minimises the UNWEIGHTED masked cross-entropy by default (train_loss
# "masked_ce", as the authors' code does): with the linear schedule w(t) = 1/t, so a block
# drawn near t = 0 (one [MASK]) counts hundreds of times more than a fully masked one, and
# the gradient's variance grows with it. Both losses ask each masked token for x0_i; the
# weight only changes how much each noise level counts. Evaluation reports the NELBO.

def masked_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS (a): log p_theta(x_0 | x_t) at [MASK] (b, L, V): zero mass on [MASK]; float32 always."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -math.inf)
    return F.log_softmax(logits, dim=-1)


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS (a) and (b): log p_theta(x_0 | x_t) (b, L, V): masked_log_probs at [MASK]; carry-over
    elsewhere (log p = 0 on x_t itself, -inf on the rest): unmasked tokens add exactly 0 to the loss."""
    log_p = masked_log_probs(logits, mask_id)
    carry = torch.where(torch.arange(logits.shape[-1], device=x_t.device) == x_t[..., None], 0.0, -math.inf)
    return torch.where((x_t != mask_id)[..., None], carry, log_p)


def loss_weight(alpha_t: torch.Tensor, alpha_prime_t: torch.Tensor) -> torch.Tensor:
    """NELBO weight of a masked token at time t: -alpha'(t) / (1 - alpha(t)) (linear: 1/t)."""
    return -alpha_prime_t / (1.0 - alpha_t)


@dataclass
class Loss:
    loss: torch.Tensor  # what training minimises: masked_ce or nelbo (the train_loss option)
    nelbo: torch.Tensor  # sum over targets of w_k * (-log p(x0_i | x_t)), / n_targets
    masked_ce: torch.Tensor  # sum over targets of -log p(x0_i | x_t) (unweighted), / n_targets
    n_targets: torch.Tensor  # number of target tokens the averages are taken over
    row_nats: torch.Tensor  # (b,) per row: sum of w_k * (-log p) (AR: -log p), for the standard error
    target_ids: torch.Tensor  # (b, L') the target token ids those nats are for, PAD elsewhere


def diffusion_loss(logits: torch.Tensor, x0: torch.Tensor, noised: Noised,
                   target_mask: torch.Tensor, mask_id: int, importance: Optional[torch.Tensor] = None):
    """NELBO per token = (1 / n_targets) * sum_{target i} w_k * (-log p(x0_i | x_t)),
    w_k = -alpha'(t_k) / (1 - alpha(t_k)) for i's block k (unmasked targets add 0: SUBS).
    importance (b, L): 1 / p(t_k) when t was drawn from a density p other than U[0, 1]
    (evaluation). Returns (nelbo, masked_ce, n_targets, row_nats (b,))."""
    log_p = subs_log_probs(logits, noised.x_t, mask_id)  # (b, L, V)
    nll = -log_p.gather(-1, x0[..., None]).squeeze(-1)  # (b, L); 0 where x_t == x0
    w = loss_weight(noised.alpha_t, noised.alpha_prime_t)  # (b, L)
    if importance is not None:
        w = w * importance
    n_targets = target_mask.sum().clamp(min=1)
    masked_ce = torch.where(target_mask, nll, 0.0).sum() / n_targets
    row_nats = torch.where(target_mask, w * nll, 0.0).sum(1)  # (b,)
    return row_nats.sum() / n_targets, masked_ce, n_targets, row_nats


TRAIN_LOSSES = ("masked_ce", "nelbo")  # what training minimises (see above)


@dataclass
class LossOptions:
    """How a model's forward computes its Loss. Every model's forward takes this one object,
    so a new option is a field here and the line that reads it (diffusion_forward)."""
    train_loss: str = "masked_ce"  # what Loss.loss is: "masked_ce" or "nelbo" (TRAIN_LOSSES)
    # evaluation (models.eval_nelbo): (b, K, generator, device) -> (t, 1/p(t)), t drawn over
    # all of [0, 1]; x_t then comes from q exactly (no block is forced to hold a [MASK])
    eval_t_sampler: Optional[Callable] = None

    def __post_init__(self):
        if self.train_loss not in TRAIN_LOSSES:
            raise ValueError(f"train_loss must be one of {TRAIN_LOSSES}, got {self.train_loss!r}")


def check_length(cfg: ModelConfig, L: int, block_len: int) -> None:
    """Clear errors for a training input the model cannot take."""
    if L % block_len != 0 or L > cfg.seq_len:
        raise ValueError(f"sequence length {L} must be a multiple of block_len={block_len} "
                         f"and at most seq_len={cfg.seq_len}")


def diffusion_forward(model, x0, prompt_mask, block_len, generator=None, opts: LossOptions = LossOptions()) -> Loss:
    """The training step of E2D2 (and of BD3-LM and MDLM): one t per block, x_t ~ q(x_t | x_0),
    the logits of every noisy token in ONE call of model.logits(x0, x_t, prompt_mask) (the
    network: section 6 for E2D2; the prompt is read bidirectionally), then the losses.
    x0: (b, L) clean tokens (PAD = padding); prompt_mask: (b, L) bool, True on the prompt
    (never noised, never a target)."""
    cfg = model.cfg
    b, L = x0.shape
    check_length(cfg, L, block_len)
    target_mask = (x0 != cfg.pad_id) & ~prompt_mask  # what the loss is averaged over
    if opts.eval_t_sampler is None:  # training: (b, K)
        t, importance = sample_t(b, L // block_len, cfg.t_min, cfg.t_max, generator, x0.device), None
    else:  # evaluation: (b, K) each, then 1 / p(t) on every token (b, L)
        t, importance = opts.eval_t_sampler(b, L // block_len, generator, x0.device)
        importance = importance.repeat_interleave(block_len, dim=1)
    noised = q_sample(x0, target_mask, t, block_len, cfg.mask_id, cfg.schedule,
                      ensure_masked=opts.eval_t_sampler is None, generator=generator)
    logits = model.logits(x0, noised.x_t, prompt_mask)  # (b, L, V); the prompt is read bidirectionally
    nelbo, masked_ce, n, row_nats = diffusion_loss(logits, x0, noised, target_mask, cfg.mask_id, importance)
    target_ids = torch.where(target_mask, x0, cfg.pad_id)  # which tokens the nats are for
    return Loss(masked_ce if opts.train_loss == "masked_ce" else nelbo, nelbo, masked_ce, n, row_nats, target_ids)


# ---------------------------------------------------------------------------------------
# 4. The two attention masks. block(i) = i // B. Each mask is built by ONE function, which
# training, the uncached sampler, the tests and the notebooks all call. A padding query
# would see no key (softmax of an empty row is NaN), so it sees itself only; its output is
# unused. Docstrings draw each mask for L = 8, B = 2 (doctests: tests/test_masks.py runs them).

def padding_sees_itself(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace the row of every padding query (valid False) in mask (b, L, L) by "itself only"."""
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    return torch.where(valid[:, :, None], mask, eye[None])


def mask_picture(mask: torch.Tensor, block_len: int, group: int = 0) -> str:
    """A (queries, keys) mask as text: 1 = may attend, . = may not, a space between blocks
    of keys and three between groups of `group` keys (clean | noisy; default one group)."""
    cells = ["".join("1" if m else "." for m in row) for row in mask.tolist()]
    blocks = lambda s: " ".join(s[j:j + block_len] for j in range(0, len(s), block_len))  # noqa: E731
    group = group or mask.shape[-1]
    return "\n".join("   ".join(blocks(c[g:g + group]) for g in range(0, len(c), group)) for c in cells)


def encoder_mask(bidirectional: torch.Tensor, valid: torch.Tensor, block_len: int) -> torch.Tensor:
    """Encoder self-attention over the clean sequence x_0: (b, L, L). Query i sees key j iff
    j is valid and block(j) <= block(i) (block-causal), or j is `bidirectional` (b, L): a
    prompt token of a seq2seq example, read whole by every query, even when the prompt spans
    several blocks (plain text has none). Below: a prompt of 4 tokens = blocks 0 and 1; its
    block-0 queries read block 1 too, the answer's blocks 2 and 3 are block-causal.

    >>> prompt = torch.tensor([[True, True, True, True, False, False, False, False]])
    >>> valid = torch.ones(1, 8, dtype=torch.bool)  # no padding
    >>> print(mask_picture(encoder_mask(prompt, valid, block_len=2)[0], block_len=2))
    11 11 .. ..
    11 11 .. ..
    11 11 .. ..
    11 11 .. ..
    11 11 11 ..
    11 11 11 ..
    11 11 11 11
    11 11 11 11
    """
    b, L = valid.shape
    blk = torch.arange(L, device=valid.device) // block_len  # (L,) block(i) of every position
    block_causal = blk[None, :, None] >= blk[None, None, :]  # (1, L, L): [i, j] = blk(j) <= blk(i)
    sees = (block_causal | bidirectional[:, None, :]) & valid[:, None, :]  # (b, L, L)
    return padding_sees_itself(sees, valid)


def decoder_mask(valid: torch.Tensor, block_len: int) -> torch.Tensor:
    """Decoder attention: the L noisy queries x_t against the 2L keys [h ; x_t]: (b, L, 2L).
    A noisy query in block k sees clean h_j iff block(j) < k (offset block-causal: only
    FINISHED blocks) and noisy x_t,j iff block(j) == k (block-diagonal: its own block),
    never a padding key. Clean key j and noisy key j share RoPE position j.

    >>> valid = torch.ones(1, 8, dtype=torch.bool)
    >>> print(mask_picture(decoder_mask(valid, block_len=2)[0], block_len=2, group=8))
    .. .. .. ..   11 .. .. ..
    .. .. .. ..   11 .. .. ..
    11 .. .. ..   .. 11 .. ..
    11 .. .. ..   .. 11 .. ..
    11 11 .. ..   .. .. 11 ..
    11 11 .. ..   .. .. 11 ..
    11 11 11 ..   .. .. .. 11
    11 11 11 ..   .. .. .. 11

    (The mask does not depend on the prompt: with encoder_mask's 4-token prompt above,
    blocks 0 and 1 are never targets, and their rows go unused.)"""
    b, L = valid.shape
    blk = torch.arange(L, device=valid.device) // block_len  # (L,) block(i) of every position
    offset_block_causal = blk[None, :, None] > blk[None, None, :]  # (1, L, L)
    block_diagonal = blk[None, :, None] == blk[None, None, :]  # (1, L, L)
    to_clean = offset_block_causal & valid[:, None, :] & valid[:, :, None]  # a padding query sees no clean key ...
    to_noisy = padding_sees_itself(block_diagonal & valid[:, None, :], valid)  # ... only itself
    return torch.cat([to_clean, to_noisy], dim=-1)  # (b, L, 2L)


def bd3lm_mask(bidirectional: torch.Tensor, valid: torch.Tensor, block_len: int) -> torch.Tensor:
    """The picture E2D2 splits: BD3-LM (baselines.py) runs ONE network over [x_0 ; x_t]:
                    keys x_0 (clean)          keys x_t (noisy)
      x_0 queries   block-causal (+ prompt)   never                 <- encoder_mask
      x_t queries   offset block-causal       block-diagonal        <- decoder_mask
    (b, 2L, 2L). The clean rows never look at noisy keys, so E2D2 runs them alone (the
    encoder, L tokens) and only the noisy rows (the decoder) need the 2L keys. Drawn as
    above: encoder_mask's picture beside zeros, over decoder_mask's picture."""
    enc = encoder_mask(bidirectional, valid, block_len)  # (b, L, L)
    clean_rows = torch.cat([enc, torch.zeros_like(enc)], dim=-1)  # (b, L, 2L)
    return torch.cat([clean_rows, decoder_mask(valid, block_len)], dim=1)  # (b, 2L, 2L)


# ---------------------------------------------------------------------------------------
# 5. The transformer layers: RMSNorm, RoPE, attention, SwiGLU, a pre-norm Layer, and the
# base every model shares (token embedding tied to the output head, a stack of Layers).
# The encoder and the decoder are stacks of the same Layer.

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 even under bf16 autocast."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):  # [speed] torch's fused rms_norm: one call (plainest: x * rsqrt(mean(x^2) + eps))
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
    written as x * (c, c) + (x2, x1) * (-s, s) (three ops, the same products and sums) [speed]
    x: (b, n, ..., hd), position on dim 1; cos, sin: (n, hd) from rope_table."""
    shape = (x.shape[1],) + (1,) * (x.dim() - 3) + (x.shape[-1],)  # (n, 1, ..., hd): broadcast
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x2, x1) in every pair
    return (x * cos.view(shape) + swapped * sin.view(shape)).to(x.dtype)  # bf16 keys under autocast, as values


KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (b, H, n, hd), RoPE applied


class Attention(nn.Module):
    """Multi-head attention (F.scaled_dot_product_attention, boolean mask or None)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout, self.d = cfg.n_heads, cfg.dropout, cfg.d_model
        # [speed] one fused projection, rows [0, d) W_q, then W_k, W_v (plainest: three Linears)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def project_kv(self, x: torch.Tensor, cos, sin) -> KV:  # [E2D2]
        """Keys (RoPE) and values of x (b, n, d), (b, H, n, hd) each: only the K/V rows of
        the fused matrix (the E2D2 decoder's clean stream needs no queries)."""
        kv = F.linear(x, self.qkv.weight[self.d:]).unflatten(-1, (2, self.n_heads, -1))  # (b, n, 2, H, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]  # (b, n, H, hd) views
        return apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, mask, with_past: Optional[Callable] = None):
        """x: (b, n, d). Without with_past, x's queries see x's own keys/values; with_past(k, v)
        -> (keys, values) puts earlier tokens' keys/values before x's own (b, H, n_past + n, hd)
        (the E2D2 decoder's clean stream in training; a KV cache when sampling). mask:
        (b, n, n_past + n), (b, 1, n_past + n) (the same for every query) or None. Returns
        the output (b, n, d) and x's own (keys, values)."""
        qkv = self.qkv(x).unflatten(-1, (3, self.n_heads, -1))  # (b, n, 3, H, hd): a view [speed] (plainest: einops)
        qk = apply_rope(qkv[:, :, :2], cos, sin)  # queries and keys rotated in one go: (b, n, 2, H, hd)
        q, k, v = (t.transpose(1, 2) for t in (qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]))  # (b, H, n, hd) views
        keys, values = (k, v) if with_past is None else with_past(k, v)  # [past ; own]
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

    def forward(self, x, cos, sin, mask, with_past: Optional[Callable] = None):
        a, kv = self.attn(self.norm1(x), cos, sin, mask, with_past)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x))), kv


def concat_after(past_kv: KV) -> Callable:  # [E2D2]
    """A with_past for fixed earlier keys/values (the E2D2 decoder's clean stream in training):
    (k, v) -> [past_kv ; (k, v)] on the token axis, (b, H, n_past + n, hd) each."""
    return lambda k, v: (torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2))


class TokenModel(nn.Module):
    """Base of every model (E2D2 below, the baselines in baselines.py): token embedding tied
    to the output head, RoPE, weight init, `run` (a stack of Layers), and `forward`, the
    training step (section 3's diffusion_forward, one t per block of block_len). A subclass
    adds its layers, logits(...) (its network) and make_runner(...) (its sampler)."""

    exact_likelihood = False  # True for a model whose loss is an exact NLL (AR)

    def __init__(self, cfg: ModelConfig, n_positions: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model)  # final norm before the head
        self.drop = nn.Dropout(cfg.dropout)
        # RoPE's cos/sin of every position (default seq_len), once: float64, cast at the call, not saved
        cos, sin = rope_table(n_positions or cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (positions, hd)
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

    def run(self, layers, x, positions, mask, past: Optional[list] = None):
        """x (b, n, d) through `layers`; past[i] is layer i's with_past (see Attention): its
        queries also see the earlier keys/values it puts before x's own. Returns x and each
        layer's own (keys, values) of x."""
        cos, sin = self.rope(positions)
        own_kv = []
        for i, layer in enumerate(layers):
            x, kv = layer(x, cos, sin, mask, None if past is None else past[i])
            own_kv.append(kv)
        return x, own_kv

    def forward(self, x0, prompt_mask, generator=None, opts: LossOptions = LossOptions()) -> Loss:
        """The training step: x0 (b, L) clean tokens, prompt_mask (b, L) -> Loss (section 3).
        Every model's forward takes these arguments: BD3-LM uses this one; AR (an exact NLL)
        and MDLM (one block over its answer canvas) define their own (baselines.py)."""
        return diffusion_forward(self, x0, prompt_mask, self.cfg.block_len, generator, opts)



# ---------------------------------------------------------------------------------------
# 6. The E2D2 network: an encoder over the clean tokens, a decoder over the noisy ones.
# Its training step is TokenModel.forward (section 3's diffusion_forward), which calls the
# `logits` below once per batch: every block's noisy tokens are denoised in one pass.

class E2D2Network(TokenModel):  # [E2D2]
    """Encode the clean tokens, decode the noisy ones; `logits` is the training forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)  # self.embed is shared by encoder and decoder
        self.encoder = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_enc))  # N_enc layers on x_0
        # decoder layer j pairs with encoder layer pairs[j]: shared_kv reads its keys/values; tied, it IS that module
        self.pairs = [cfg.n_enc - cfg.n_dec + j if cfg.decoder_layers == "top" else j for j in range(cfg.n_dec)]
        self.decoder = nn.ModuleList(self.encoder[i] if cfg.tie_decoder else Layer(cfg) for i in self.pairs)
        self.enc_norm = RMSNorm(cfg.d_model)  # h = enc_norm(last encoder hidden state)
        self.init_weights()

    def encode(self, x0, positions, mask, past=None):
        """The N_enc encoder layers over clean tokens x0 (b, n) (past: per layer, after earlier
        clean tokens, when sampling). Returns h = enc_norm(hidden) (b, n, d) and x0's keys/values
        in every encoder layer."""
        x, enc_kv = self.run(self.encoder, self.drop(self.embed(x0)), positions, mask, past)
        return self.enc_norm(x), enc_kv

    def clean_kv(self, h, positions, enc_kv) -> list:
        """What decoder layer l sees of the clean tokens (N_dec KVs): "hidden" passes h through
        layer l's OWN input norm and K/V projection (in BD3-LM each layer's clean keys come
        from its own clean hidden state instead); "shared_kv" reuses the keys/values of its
        paired encoder layer (no projection at all), as a layer of an AR model reads its own depth."""
        if self.cfg.decoder == "shared_kv":
            return [enc_kv[i] for i in self.pairs]
        cos, sin = self.rope(positions)
        return [layer.attn.project_kv(layer.norm1(h), cos, sin) for layer in self.decoder]

    def decode(self, x_t, positions, mask, past) -> torch.Tensor:
        """The N_dec decoder layers over noisy tokens x_t (b, n); decoder layer l's queries see
        the clean keys/values past[l] puts before their own. Logits (b, n, V)."""
        z, _ = self.run(self.decoder, self.drop(self.embed(x_t)), positions, mask, past)
        return self.head(z)

    def logits(self, x0, x_t, bidirectional) -> torch.Tensor:
        """The training forward, all blocks in one pass (b, L, V): the encoder reads x_0 (L
        tokens, `bidirectional` read whole), the decoder x_t (L queries, 2L keys [h ; x_t]);
        BD3-LM runs N layers over 2L tokens."""
        valid = x0 != self.cfg.pad_id
        positions = slice(0, x0.shape[1])  # x_0,j and x_t,j share position j
        enc_mask = encoder_mask(bidirectional, valid, self.cfg.block_len)  # (b, L, L)
        h, enc_kv = self.encode(x0, positions, enc_mask)  # N_enc layers over L clean tokens
        clean_kv = self.clean_kv(h, positions, enc_kv)  # per decoder layer, L keys each
        dec_mask = decoder_mask(valid, self.cfg.block_len)  # (b, L, 2L)
        return self.decode(x_t, positions, dec_mask, [concat_after(kv) for kv in clean_kv])  # N_dec layers, 2L keys


# ---------------------------------------------------------------------------------------
# 7. The cached sampler. One generation, for b prompts, block by block:
#
#   prompt      the ENCODER runs once over it: its keys/values are kept in each encoder
#               layer (cache `enc`), and what each decoder layer sees of it (h projected
#               by that layer, or shared_kv's encoder keys) is kept too (cache `dec`).
#   block k     T denoising steps (section 8), each runs the DECODER ONLY (logits): the
#               block's B noisy queries attend to dec's cached clean keys/values and to
#               the block's own B keys, written into a scratch slot after the cache
#               (KVCache.place_after) and never kept.
#   finish_block  the finished block runs through the encoder once (B queries against
#               enc); its keys/values join enc (KVCache.append), and what each decoder
#               layer sees of it (h projected, or shared_kv's encoder keys) joins dec.
#   last block  never encoded: nothing comes after it.
# enc and dec always hold the same n clean tokens, and RoPE positions continue from n. The
# logits of block k equal the training forward's (section 6): the masks of section 4 say
# exactly which keys a query sees, and the caches hold exactly those (a test checks it).

class KVCache:
    """The keys/values of the clean tokens so far, per layer, and which tokens are valid (a
    left-padded prompt's padding is not). n: how many tokens it holds."""

    def __init__(self, n_layers: int, batch: int, max_len: int, device):
        self.k, self.v = [None] * n_layers, [None] * n_layers  # (b, H, max_len, hd): allocated at the first write
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.n, self.padded = 0, False  # tokens cached; is any of them padding (else no mask)?

    def place_after(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Place the new tokens' keys/values k, v (b, H, n_new, hd) right after the n cached
        ones in the layer's buffer (the scratch slot [n, n + n_new)) and return both, what the
        new queries attend to: [cached ; new], (b, H, n + n_new, hd). The new ones stay only
        if append() follows."""
        if self.k[layer] is None:  # [speed] empty, not zeros: a position is written before it is read
            shape = (k.shape[0], k.shape[1], self.valid.shape[1], k.shape[3])  # (b, H, max_len, hd)
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.n + k.shape[2]
        self.k[layer][:, :, self.n:end], self.v[layer][:, :, self.n:end] = k, v  # [speed] plainest:
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # torch.cat([cached, new]), a copy per call

    def per_layer(self) -> list:
        """Per layer, a with_past function (see Attention) that places the new keys/values
        after this cache's: the `past` that run() takes."""
        return [functools.partial(self.place_after, i) for i in range(len(self.k))]

    def append(self, tokens: torch.Tensor, pad_id: int, kv: Optional[list] = None):
        """The clean tokens (b, n_new) whose keys/values were just written stay (n += n_new);
        kv: their keys/values per layer, written now (E2D2's decoder cache: projected h)."""
        for layer, (k, v) in enumerate(kv or []):
            self.place_after(layer, k, v)
        valid = tokens != pad_id  # (b, n_new)
        self.valid[:, self.n:self.n + tokens.shape[1]] = valid
        self.n += tokens.shape[1]
        self.padded = self.padded or not bool(valid.all())  # [speed] one host sync per block, not per step

    def key_mask(self, n_new: int) -> Optional[torch.Tensor]:
        """The keys n_new new queries may see: every valid cached token and all n_new new ones,
        the same for every query: (b, 1, n + n_new), or None (everything) without padding
        ([speed]: attention without a mask; plainest: the all-True mask)."""
        return self.valid[:, None, :self.n + n_new] if self.padded else None

    def select(self, rows):
        """Keep only these sequences (a bool (b,) or index tensor): the others stopped (wrote [EOS])."""
        self.k, self.v = ([None if t is None else t[rows] for t in ts] for ts in (self.k, self.v))
        self.valid = self.valid[rows]


def read_bidirectionally(cfg: ModelConfig, prompt: torch.Tensor) -> torch.Tensor:
    """Which tokens of a (left-padded) prompt (b, P') the encoder reads bidirectionally, as
    training did: every valid token (seq2seq training read its prompts whole), or none
    (plain-text training had no prompt, so the sampler reads it block-causally)."""
    return (prompt != cfg.pad_id) & (cfg.prompt_attention == "bidirectional")  # (b, P')


class Runner:
    """What the block loop (section 8) asks of a model's sampler (its make_runner returns one):
    block_len B; answer_len (b,) positions per row; first_block: the number of the first
    answer block, ceil(P' / B) (E2D2, BD3-LM: the prompt's P' positions are blocks 0 ..
    first_block - 1; AR: block P' + i is answer token i; MDLM's one block, its whole answer
    canvas, is block 1);
    logits(x_block) -> (b, B, V), one network call; finish_block(block): a finished block
    joins the clean context; select(rows): only these rows go on; encoder_calls /
    decoder_calls: network passes over clean / noisy tokens."""

    def __init__(self, model, prompt: torch.Tensor, max_new_tokens: Optional[int], block_len: int = 0):
        self.model, self.mask_id, self.block_len = model, model.cfg.mask_id, block_len or model.cfg.block_len
        answer = max_new_tokens or model.cfg.seq_len - prompt.shape[1]  # default: all the room left
        self.answer_len = torch.full((prompt.shape[0],), answer, device=prompt.device)
        self.first_block = math.ceil(prompt.shape[1] / self.block_len)
        self.encoder_calls = self.decoder_calls = 0

    def steps_per_block(self, steps: Optional[int]) -> int:
        return steps or self.block_len  # default T = B, as in the paper

    def empty_block(self) -> torch.Tensor:
        """The block every step starts from: all [MASK], (rows still going, B)."""
        return torch.full((len(self.answer_len), self.block_len), self.mask_id, device=self.answer_len.device)

    def select(self, rows):
        self.answer_len = self.answer_len[rows]


class CachedE2D2(Runner):  # [E2D2]
    """E2D2's sampler (the timeline above): caches `enc` (the clean tokens in every encoder
    layer) and `dec` (what every decoder layer sees of them), filled once per token."""

    def __init__(self, model: E2D2Network, prompt: torch.Tensor, max_new_tokens=None):
        super().__init__(model, prompt, max_new_tokens)
        cfg = model.cfg
        self.enc = KVCache(cfg.n_enc, prompt.shape[0], cfg.seq_len, prompt.device)
        self.dec = KVCache(cfg.n_dec, prompt.shape[0], cfg.seq_len, prompt.device)
        if prompt.shape[1] > 0:  # the prompt is read as in training
            self.encode(prompt, encoder_mask(read_bidirectionally(cfg, prompt), prompt != cfg.pad_id, cfg.block_len))

    def encode(self, tokens, mask):
        """Encode new clean tokens (b, n) after the cached ones; both caches grow by n."""
        positions = slice(self.enc.n, self.enc.n + tokens.shape[1])  # RoPE continues after the cache
        # keys/values are placed in enc's scratch slot ...
        h, enc_kv = self.model.encode(tokens, positions, mask, self.enc.per_layer())
        self.enc.append(tokens, self.model.cfg.pad_id)  # ... where they stay
        clean_kv = self.model.clean_kv(h, positions, enc_kv)  # projected ONCE per clean token
        self.dec.append(tokens, self.model.cfg.pad_id, clean_kv)
        self.encoder_calls += 1

    def logits(self, x_block):
        """One denoising step's network call: only the decoder runs, its B noisy queries
        against [dec's cached clean keys ; the block's own keys] (the own keys are written
        into dec's scratch slot and never kept: no append follows)."""
        n = self.dec.n
        self.decoder_calls += 1
        return self.model.decode(x_block, slice(n, n + x_block.shape[1]),  # (b, B, V)
                                 self.dec.key_mask(x_block.shape[1]), self.dec.per_layer())

    def finish_block(self, block):
        """A finished block (b, B) goes through the encoder once (BD3-LM: all N layers)."""
        self.encode(block, self.enc.key_mask(block.shape[1]))

    def select(self, rows):
        super().select(rows)
        self.enc.select(rows)
        self.dec.select(rows)


class UncachedRunner(Runner):
    """No cache: every step re-runs the training forward (model.logits) on [context ; noisy
    block], keeps the block's logits: the reference every cached runner must match. The
    clean stream is block-causal, so the block's slot of x0 cannot reach its logits: x_t goes
    there. runs_encoder: each call also counts as an encoder call (E2D2 re-runs it)."""

    def __init__(self, model, prompt, max_new_tokens, block_len: int = 0, runs_encoder: bool = False):
        super().__init__(model, prompt, max_new_tokens, block_len)
        self.context, self.n_prompt, self.runs_encoder = prompt, prompt.shape[1], runs_encoder
        self.bidirectional = read_bidirectionally(model.cfg, prompt)  # (b, P'): as in training

    def logits(self, x_block):
        x = torch.cat([self.context, x_block], dim=1)  # (b, n + B)
        bidirectional = F.pad(self.bidirectional, (0, x.shape[1] - self.n_prompt))  # False after the prompt
        self.decoder_calls += 1
        self.encoder_calls += self.runs_encoder
        return self.model.logits(x, x, bidirectional)[:, -x_block.shape[1]:]  # (b, B, V)

    def finish_block(self, block):
        self.context = torch.cat([self.context, block], dim=1)

    def select(self, rows):
        super().select(rows)
        self.context, self.bidirectional = self.context[rows], self.bidirectional[rows]


class E2D2(E2D2Network):  # [E2D2]
    """The E2D2 model: the network (section 6; its training step is TokenModel.forward) with
    its samplers."""

    def make_runner(self, prompt, use_cache: bool, max_new_tokens=None) -> Runner:
        return (CachedE2D2(self, prompt, max_new_tokens) if use_cache
                else UncachedRunner(self, prompt, max_new_tokens, runs_encoder=True))


# ---------------------------------------------------------------------------------------
# 8. The block loop: sampling, block by block, with the runner the model hands it.

@dataclass
class SampleOutput:
    tokens: list  # per sequence: the generated token ids, cut before the first [EOS]
    finished: list  # per sequence: True if it produced [EOS]
    network_calls: int  # model calls that produced logits (NFE)
    encoder_calls: int  # passes over clean tokens: E2D2's encoder, BD3-LM's clean blocks
    decoder_calls: int  # passes over noisy tokens (E2D2: the decoder stack)
    new_tokens: int  # tokens generated, summed over the batch (up to and with [EOS])


def left_pad(prompts: list, block_len: int, pad_id: int, device=None) -> torch.Tensor:
    """Left-pad prompts to (b, P'), P' = ceil(longest / B) * B: every answer starts at the same
    block boundary (training pads each row to its own; padding is never attended to)."""
    n = max((len(p) for p in prompts), default=0)
    width = block_len * math.ceil(n / block_len)
    out = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # (an empty prompt writes an empty slice)
        out[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    return out


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filtering of probs (..., V): keep a token iff the mass ranked above it is < top_p
    (the top one always is), zero the rest, renormalise. top_p = 1 keeps every token."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (..., V) each
    keep_sorted = sorted_p.cumsum(-1) - sorted_p < top_p  # mass of the tokens ranked above
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to token order
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def most_confident(is_mask, score, alpha_s, n_fill) -> torch.Tensor:
    """Reveal the [MASK] positions of highest score so that floor((1 - alpha_s) n) stay
    masked (n = n_fill, the positions of each row), but at least one is revealed. (b, B)."""
    n_stay = torch.floor((1.0 - alpha_s) * n_fill.double() + 1e-6).long()  # (b,)
    n_stay = torch.minimum(torch.clamp(is_mask.sum(1) - 1, min=0), n_stay)  # (b,)
    rank = score.masked_fill(~is_mask, math.inf).argsort(dim=1, stable=True).argsort(dim=1)  # 0 = least sure
    return is_mask & (rank >= n_stay[:, None])  # (revealed tokens rank last: never re-masked)


# The strategies: which [MASK] positions a denoising step reveals. Each is a function of
# (probs (b, B, V): p_theta(x_0 | x_t) after temperature and top_p; pred (b, B): x_theta, the
# token each position would take; is_mask (b, B); alpha_t, alpha_s; n_fill (b,); generator)
# -> reveal (b, B) bool. A new strategy is one function and one entry in STRATEGIES.

def remask(probs, pred, is_mask, alpha_t, alpha_s, n_fill, generator) -> torch.Tensor:
    """Predict and remask (E2D2's default sampler): reveal the [MASK] whose prediction is most
    likely, p_theta(x_theta), on the schedule of most_confident."""
    confidence = probs.gather(-1, pred[..., None]).squeeze(-1)  # (b, B)
    return most_confident(is_mask, confidence, alpha_s, n_fill)


def margin(probs, pred, is_mask, alpha_t, alpha_s, n_fill, generator) -> torch.Tensor:
    """As remask, ranked by the margin between the two most likely tokens, p1 - p2: a
    position torn between two answers waits, even when its top token is likely."""
    top2 = probs.topk(2, dim=-1).values  # (b, B, 2)
    return most_confident(is_mask, top2[..., 0] - top2[..., 1], alpha_s, n_fill)


def ancestral(probs, pred, is_mask, alpha_t, alpha_s, n_fill, generator) -> torch.Tensor:
    """x_s ~ q(x_s | x_t, x_theta): each [MASK] revealed with probability (alpha_s - alpha_t) / (1 - alpha_t)."""
    u = torch.rand(is_mask.shape, generator=generator, device=is_mask.device)
    return is_mask & (u < (alpha_s - alpha_t) / (1.0 - alpha_t))


STRATEGIES = {"remask": remask, "margin": margin, "ancestral": ancestral}


def denoise_step(logits, x, alpha_t: float, alpha_s: float, mask_id: int, strategy: str = "remask",
                 temperature: float = 0.0, top_p: float = 1.0, confidence_threshold: Optional[float] = None,
                 generator=None, final: bool = False, n_fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One reverse step t -> s (s < t, alpha_t = alpha(t) < alpha_s) on a block x (b, B) ->
    x_s. x_theta: the argmax of p_theta (temperature 0) or a sample of softmax(logits /
    temperature) (top_p < 1: of its nucleus). Which [MASK] it reveals: STRATEGIES[strategy]
    ("remask" reveals the most confident: "predict and remask"; "margin" the widest gap
    between the two likeliest tokens; "ancestral" draws x_s ~ q(x_s | x_t, x_theta));
    confidence_threshold also reveals every [MASK] whose p(x_theta) exceeds it; `final`
    reveals all. Revealed tokens never change (SUBS carry-over). n_fill
    (b,): the positions each row fills (default B; MDLM: its own)."""
    is_mask = x == mask_id  # (b, B)
    # [speed] Only [MASK] positions need SUBS probabilities: the final torch.where keeps revealed
    # tokens anyway, so subs_log_probs' carry-over one-hot (b, B, V) is never built here.
    probs = masked_log_probs(logits if temperature == 0 else logits / temperature, mask_id).exp()
    probs = nucleus(probs, top_p)  # (b, B, V)
    if temperature == 0:  # x_theta: the argmax, or a sample of probs
        pred = probs.argmax(-1)  # (b, B)
    else:
        pred = torch.multinomial(rearrange(probs, "b n V -> (b n) V"), 1, generator=generator).view(x.shape)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
    n_fill = torch.full((x.shape[0],), x.shape[1], device=x.device) if n_fill is None else n_fill
    reveal = is_mask if final else STRATEGIES[strategy](probs, pred, is_mask, alpha_t, alpha_s, n_fill, generator)
    if confidence_threshold is not None:  # Fast-dLLM style: every confident [MASK] too
        confidence = probs.gather(-1, pred[..., None]).squeeze(-1)  # p(x_theta): (b, B)
        reveal = reveal | (is_mask & (confidence > confidence_threshold))
    return torch.where(reveal, pred, x)


def check_sampling_args(cfg, prompts, prompt_width, max_new_tokens, steps, strategy, temperature, top_p):
    """Clear errors for arguments generate() cannot use (prompt_width: P' after left_pad)."""
    room = cfg.seq_len - prompt_width  # positions left for the answer
    for ok, message in [
            (prompts, "generate() needs at least one prompt"),
            (room >= cfg.block_len, f"prompt of {max(map(len, prompts), default=0)} tokens ({prompt_width} after "
             f"aligning to blocks of {cfg.block_len}) leaves no room to generate within seq_len={cfg.seq_len}"),
            (max_new_tokens is None or 1 <= max_new_tokens <= room, f"max_new_tokens={max_new_tokens} must be "
             f"between 1 and {room} (seq_len={cfg.seq_len} minus the {prompt_width} aligned prompt positions)"),
            (steps is None or steps >= 1, f"steps must be >= 1, got {steps}"),
            (strategy in STRATEGIES, f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}"),
            (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
            (0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}")]:
        if not ok:
            raise ValueError(message)


@torch.no_grad()
def generate(model: TokenModel, prompts: list, max_new_tokens: Optional[int] = None,
             steps: Optional[int] = None, strategy: str = "remask", temperature: float = 0.0,
             top_p: float = 1.0, confidence_threshold: Optional[float] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None, on_step: Optional[Callable] = None,
             stop_at_eos: bool = True) -> SampleOutput:
    """Generate answers for a batch of prompts (lists of token ids, any lengths).

    Block by block (the runner sets B: E2D2 block_len; MDLM the whole answer; AR one token),
    from all [MASK], T = `steps` (default B) denoise_steps per block (t from 1 to 0; see there
    for strategy etc.) on the runner's logits; an unchanged block reuses the last logits. A
    finished block joins the context (runner.finish_block: encoded, cached); a row stops
    after the block where it wrote [EOS] (stop_at_eos). on_step(block, step, rows, x_block)
    runs after every step (--show); `block` counts over the whole sequence, the prompt's
    blocks first (runner.first_block)."""
    cfg, device = model.cfg, model.embed.weight.device
    prompt = left_pad(prompts, cfg.block_len, cfg.pad_id, device)  # (b, P')
    check_sampling_args(cfg, prompts, prompt.shape[1], max_new_tokens, steps, strategy, temperature, top_p)
    was_training = model.training
    model.eval()
    runner = model.make_runner(prompt, use_cache, max_new_tokens)  # the model's own sampler
    B, T = runner.block_len, runner.steps_per_block(steps)
    answer_len = runner.answer_len.tolist()  # positions each row generates
    n_blocks = math.ceil(max(answer_len) / B)
    # alpha(t) on the time grid t_0 = 1 > t_1 > ... > t_T = 0, as floats (one tensor op)
    alpha = noise_schedule(cfg.schedule, torch.linspace(1.0, 0.0, T + 1, dtype=torch.float64))[0].tolist()
    out = torch.full((len(prompts), n_blocks * B), cfg.pad_id, dtype=torch.long, device=device)
    rows = torch.arange(len(prompts), device=device)  # the sequences still generating
    network_calls = 0
    for j in range(n_blocks):  # the j-th answer block is block first_block + j of the sequence
        x = runner.empty_block()  # (rows, B) all [MASK] (MDLM: PAD past each row's answer)
        n_fill, last_x = (x == cfg.mask_id).sum(1), None  # positions each row fills
        for i in range(T):
            if not (x == cfg.mask_id).any():  # the block is complete
                break
            if last_x is None or not torch.equal(x, last_x):  # [speed] unchanged: the same logits
                logits, last_x = runner.logits(x), x  # (rows, B, V)
                network_calls += 1
            x = denoise_step(logits, x, alpha[i], alpha[i + 1], cfg.mask_id, strategy, temperature,
                             top_p, confidence_threshold, generator, final=i == T - 1, n_fill=n_fill)
            if on_step is not None:
                on_step(runner.first_block + j, i, rows, x)
        out[rows, j * B:(j + 1) * B] = x
        done = (x == cfg.eos_id).any(dim=1) if stop_at_eos else torch.zeros_like(rows, dtype=torch.bool)
        if j == n_blocks - 1 or done.all():
            break
        runner.finish_block(x)  # the finished block becomes clean context
        if done.any():  # per-sequence stop at [EOS]
            runner.select(~done)
            rows = rows[~done]
    model.train(was_training)
    # cut every row at its first [EOS] (the rest of that block is [EOS] or noise)
    answers = [row[:n] for row, n in zip(out.tolist(), answer_len)]
    finished = [stop_at_eos and cfg.eos_id in row for row in answers]
    tokens = [row[:row.index(cfg.eos_id)] if f else row for row, f in zip(answers, finished)]
    new = sum(len(row) + f for row, f in zip(tokens, finished))  # [EOS] counts as generated
    return SampleOutput(tokens, finished, network_calls, runner.encoder_calls, runner.decoder_calls, new)
