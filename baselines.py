"""
The three models E2D2 is compared with, built from e2d2.py's pieces (the same Layer,
attention, masks, schedules, forward process, loss and block loop), N = n_enc layers each:

  AR:     a causal transformer, next-token loss, KV-cached sampling one token at a time.
  MDLM:   one bidirectional network over [prompt ; noisy answer], one t per sequence;
          no cache is possible: every denoising step runs the full network.
  BD3-LM: one network over [x_0 ; x_t] (2L tokens) with e2d2.bd3lm_mask; sampling caches
          the clean blocks' keys/values but runs all N layers at every denoising step,
          where E2D2 runs only its N_dec decoder layers.

Each model hands e2d2.generate its sampler, an e2d2.Runner (section 7 of e2d2.py); a
runner comes right before the model whose make_runner returns it. Nothing in e2d2.py
imports this file: E2D2 is told without its baselines.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from e2d2 import (KVCache, Layer, Loss, LossOptions, ModelConfig, Runner, TokenModel, UncachedRunner, bd3lm_mask,
                  check_length, diffusion_forward, encoder_mask, padding_sees_itself, read_bidirectionally)

# ---------------------------------------------------------------------------------------
# The two masks only the baselines use (E2D2's encoder/decoder masks are in e2d2.py).
# ---------------------------------------------------------------------------------------


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """AR: query i sees real keys j <= i. (b, L, L)."""
    L = valid.shape[1]
    tril = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    return padding_sees_itself(tril[None] & valid[:, None, :], valid)


def full_mask(valid: torch.Tensor) -> torch.Tensor:
    """MDLM: every query sees every real key (bidirectional). (b, L, L)."""
    L = valid.shape[1]
    return padding_sees_itself(valid[:, None, :].expand(-1, L, L), valid)


class OneStack(TokenModel):
    """A baseline's network: one stack of N = n_enc layers (no encoder/decoder split)."""

    def __init__(self, cfg: ModelConfig, n_positions: int = 0):
        super().__init__(cfg, n_positions)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_enc))
        self.init_weights()


# ---------------------------------------------------------------------------------------
# AR: causal, next-token loss. In the block loop it is a model whose blocks are one token
# long and take one step: its runner returns the next token's logits.
# ---------------------------------------------------------------------------------------


class ARRunner(Runner):
    """Token-by-token sampling. With the cache, each call feeds only the tokens not yet
    run (the prompt first, then the newest token; keys/values of the rest are cached);
    without it, each call re-runs the causal forward over [prompt ; generated so far]."""

    def __init__(self, model, prompt: torch.Tensor, use_cache: bool, max_new_tokens=None):
        if prompt.shape[1] == 0:
            raise ValueError("the AR model needs a non-empty prompt to predict the first token from")
        super().__init__(model, prompt, max_new_tokens, block_len=1)  # one token per "block" ...
        self.use_cache = use_cache
        self.cache = KVCache(model.cfg.n_enc, prompt.shape[0], model.cfg.seq_len, prompt.device)
        self.seq, self.new = prompt, prompt  # seq: everything so far; new: tokens not yet cached

    def steps_per_block(self, steps):
        return 1  # ... decided in one step

    def logits(self, x_block):
        """(b, 1, V): the logits of the token after everything so far (x_block, one
        [MASK], only says where that token goes)."""
        if self.use_cache:  # only the new tokens run; their keys/values are written into the cache
            logits, _ = self.model.logits(self.new, self.cache)
            self.cache.append(self.new, self.model.cfg.pad_id)
        else:
            logits, _ = self.model.logits(self.seq)
        self.decoder_calls += 1
        return logits[:, -1:]  # the last position predicts the next token

    def finish_block(self, block):
        self.seq, self.new = torch.cat([self.seq, block], 1), block

    def select(self, rows):
        super().select(rows)
        self.cache.select(rows)
        self.seq, self.new = self.seq[rows], self.new[rows]


class AR(OneStack):
    def logits(self, x, cache: KVCache = None):
        """Causal logits (b, n, V) of tokens x; logits[:, i] predicts the token after
        x[:, i]. With a KVCache of `start` earlier tokens, x sits at positions start.. and
        attends to them too. Returns the logits and the per-layer (k, v) of x."""
        b, n = x.shape
        start = 0 if cache is None else cache.n
        valid = x != self.cfg.pad_id
        if n == 1 and start > 0:  # one new token (sampling): it sees every real cached key and
            # itself: one row read off the cache's key padding, where causal_mask would build
            # (b, start + 1, start + 1) at every token. A [PAD] query sees only itself, as in
            # causal_mask (and the uncached reference): its row still predicts the next token.
            sees = cache.valid[:, None, :start + 1]  # (b, 1, start + 1); position start: itself
            itself = F.one_hot(torch.full((b, 1), start, device=x.device), start + 1).bool()
            mask = torch.where(valid[:, :, None], sees, itself)
        else:
            past_valid = valid[:, :0] if cache is None else cache.valid[:, :start]  # (b, start)
            mask = causal_mask(torch.cat([past_valid, valid], 1))[:, start:]  # (b, n, start + n)
        h, new_kv = self.run(self.layers, self.drop(self.embed(x)), slice(start, start + n), mask,
                             None if cache is None else cache.per_layer())
        return self.head(h), new_kv

    exact_likelihood = True  # its loss is the exact NLL: evaluation needs no draws of t

    def forward(self, x0, prompt_mask, generator=None, opts: LossOptions = LossOptions()) -> Loss:
        """Next-token cross-entropy on the answer tokens (an exact NLL, so nelbo = loss, and
        evaluation needs no draws: no option of opts applies, there is no t to draw)."""
        check_length(self.cfg, x0.shape[1], 1)
        target = (x0 != self.cfg.pad_id) & ~prompt_mask
        logits, _ = self.logits(x0)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
        nll = F.cross_entropy(rearrange(logits[:, :-1], "b n V -> b V n"), x0[:, 1:],
                              reduction="none")  # (b, L-1): -log p(x_{i+1} | x_<=i)
        tgt = target[:, 1:]
        n = tgt.sum().clamp(min=1)
        row_nats = torch.where(tgt, nll, torch.zeros_like(nll)).sum(1)  # (b,)
        loss = row_nats.sum() / n
        return Loss(loss, loss, loss, n, row_nats, torch.where(tgt, x0[:, 1:], self.cfg.pad_id))

    def make_runner(self, prompt, use_cache: bool, max_new_tokens=None):
        return ARRunner(self, prompt, use_cache, max_new_tokens)


# ---------------------------------------------------------------------------------------
# MDLM: one bidirectional network; the whole answer is one block.
# ---------------------------------------------------------------------------------------


class MDLMRunner(UncachedRunner):
    """MDLM's sampler: the whole answer is ONE block, and each row fills its own answer
    length (`answer_len`): the positions after it stay PAD, never filled."""

    def __init__(self, model, prompt, answer_len: torch.Tensor):
        super().__init__(model, prompt, None, block_len=int(answer_len.max()))
        self.answer_len = answer_len

    def empty_block(self):
        fill = torch.arange(self.block_len, device=self.answer_len.device) < self.answer_len[:, None]
        return torch.where(fill, self.mask_id, self.model.cfg.pad_id)  # (b, B): [MASK], then PAD


class MDLM(OneStack):
    def __init__(self, cfg: ModelConfig):
        # RoPE for 2 seq_len positions: its batched sampler lays out rows whose prompts
        # differ in length side by side, each with its own answer (see make_runner)
        super().__init__(cfg, n_positions=2 * cfg.seq_len)

    def logits(self, x0, x_t, bidirectional):
        """Bidirectional logits over x_t (b, L, V); MDLM never reads x0 (nor needs `bidirectional`)."""
        valid = x_t != self.cfg.pad_id
        h, _ = self.run(self.layers, self.drop(self.embed(x_t)), slice(0, x_t.shape[1]), full_mask(valid))
        return self.head(h)

    def forward(self, x0, prompt_mask, generator=None, opts: LossOptions = LossOptions()) -> Loss:
        """MDLM trains on a fixed answer canvas: everything after the prompt up to seq_len
        is target, [EOS] after the answer (the sampler fills the same canvas), and the whole
        canvas is ONE block, so one t per sequence."""
        cfg = self.cfg
        check_length(cfg, x0.shape[1], 1)
        b, L = x0.shape
        x0 = F.pad(x0, (0, cfg.seq_len - L), value=cfg.pad_id)  # (b, seq_len)
        prompt_mask = F.pad(prompt_mask, (0, cfg.seq_len - L), value=False)
        x0 = torch.where(~prompt_mask & (x0 == cfg.pad_id), cfg.eos_id, x0)  # the canvas
        return diffusion_forward(self, x0, prompt_mask, cfg.seq_len, generator, opts)

    def make_runner(self, prompt, use_cache: bool, max_new_tokens):
        """Bidirectional: nothing can be cached. The answer is ONE block, and each row gets
        the canvas training gave it: seq_len minus its OWN block-aligned prompt (data.collate
        lays every row out alone), or max_new_tokens if that is given. In a batch the rows'
        canvases differ: a row's positions past its canvas are PAD (never filled)."""
        cfg = self.cfg
        own_prompt = cfg.block_len * torch.ceil((prompt != cfg.pad_id).sum(1) / cfg.block_len).long()  # (b,)
        canvas = torch.full_like(own_prompt, max_new_tokens) if max_new_tokens else cfg.seq_len - own_prompt
        return MDLMRunner(self, prompt, canvas)


# ---------------------------------------------------------------------------------------
# BD3-LM: one N-layer network over [x_0 ; x_t]. E2D2 is this model with the network split.
# ---------------------------------------------------------------------------------------


class CachedBD3LM(Runner):
    """BD3-LM sampling: the clean blocks' keys/values are cached (one cache: the same
    network reads clean and noisy tokens), but every denoising step still runs ALL N
    layers on the noisy block, where E2D2 runs only its N_dec decoder layers."""

    def __init__(self, model: OneStack, prompt: torch.Tensor, max_new_tokens=None):
        super().__init__(model, prompt, max_new_tokens)
        cfg = model.cfg
        self.cache = KVCache(cfg.n_enc, prompt.shape[0], cfg.seq_len, prompt.device)
        if prompt.shape[1] > 0:  # prompt read as in training (bidirectional or block-causal)
            self.encode(prompt, encoder_mask(read_bidirectionally(cfg, prompt), prompt != cfg.pad_id, cfg.block_len))

    def run(self, tokens, mask):
        """All N layers over tokens (b, n) after the cached ones (their keys/values are written
        into the cache's scratch slot): hidden states (b, n, d)."""
        n = self.cache.n
        h, _ = self.model.run(self.model.layers, self.model.embed(tokens), slice(n, n + tokens.shape[1]),
                              mask, self.cache.per_layer())
        return h

    def logits(self, x_block):
        self.decoder_calls += 1
        h = self.run(x_block, self.cache.key_mask(x_block.shape[1]))  # the noisy keys are not kept
        return self.model.head(h)

    def encode(self, tokens, mask):
        """Clean tokens (the prompt, or a finished block) run once; their keys/values are kept."""
        self.run(tokens, mask)
        self.cache.append(tokens, self.model.cfg.pad_id)
        self.encoder_calls += 1

    def finish_block(self, block):
        self.encode(block, self.cache.key_mask(block.shape[1]))

    def select(self, rows):
        super().select(rows)
        self.cache.select(rows)


class BD3LM(OneStack):
    def logits(self, x0, x_t, bidirectional):
        """All N layers over the 2L tokens [x_0 ; x_t]; returns the noisy half's logits."""
        L = x0.shape[1]
        x = torch.cat([x0, x_t], 1)  # (b, 2L)
        positions = torch.arange(L, device=x0.device).repeat(2)  # x_0,j and x_t,j share j
        mask = bd3lm_mask(bidirectional, x0 != self.cfg.pad_id, self.cfg.block_len)  # (b, 2L, 2L)
        h, _ = self.run(self.layers, self.drop(self.embed(x)), positions, mask)
        return self.head(h[:, L:])  # (b, L, V)

    # forward: TokenModel's (e2d2.diffusion_forward, one t per block), as E2D2's

    def make_runner(self, prompt, use_cache: bool, max_new_tokens=None):
        if use_cache:
            return CachedBD3LM(self, prompt, max_new_tokens)
        return UncachedRunner(self, prompt, max_new_tokens)
