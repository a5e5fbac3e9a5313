"""Tests that grade a learner's e2d2.py (exercises.py check N, pytest --impl=FILE) and say,
when they fail, which rule of the paper the answer breaks. They compare behaviour only
(values, what changes what), never how the code is written: a mask built with Python loops
passes as the project's does. Expected values are computed here, not by e2d2.py."""
import math

import torch

from conftest import random_layout, tiny
from e2d2 import CachedE2D2, Noised, decoder_mask, denoise_step, diffusion_loss, encoder_mask

MASK, V = 9, 10


# --- the masks: every entry against the paper's rule, the first wrong one explained ---------

def mask_cases():
    """(prompt_mask, valid, B): no prompt; a prompt ending inside a block; a prompt of two
    blocks with padding on both sides; random padding (L = 12, B = 3)."""
    t = lambda s: torch.tensor([[c == "1" for c in s.replace(" ", "")]])  # noqa: E731
    yield t("00 00 00 00"), t("11 11 11 11"), 2
    yield t("11 10 00 00"), t("11 11 11 11"), 2
    yield t("01 11 00 00 00"), t("01 11 11 11 00"), 2
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(3, 12, generator=g) > 0.2
    prompt = torch.zeros(3, 12, dtype=torch.bool)
    prompt[:, :4] = True
    yield prompt & valid, valid, 3


def check_shape(mask, shape, name):
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool, \
        f"{name} must return a bool tensor (True = may attend), got {getattr(mask, 'dtype', type(mask))}"
    assert tuple(mask.shape) == shape, f"{name} must return shape {shape} (b, queries, keys), got {tuple(mask.shape)}"


def encoder_rule(prompt, valid, B, b, i, j):
    """Query i of the encoder (clean x_0) may see key j: (expected, why)."""
    if not valid[b, i]:
        return i == j, (f"query {i} is padding: it sees itself only (padding_sees_itself), else its softmax row "
                        f"is empty (NaN)")
    if not valid[b, j]:
        return False, f"query {i} sees key {j}, which is padding: padding keys are never seen"
    if prompt[b, j]:
        return True, (f"query {i} (block {i // B}) does not see prompt token {j} (block {j // B}): the prompt is "
                      f"read bidirectionally, every query sees every prompt token, even one in a later block "
                      f"(you read the prompt block-causally)")
    if j // B <= i // B:
        return True, (f"query {i} (block {i // B}) does not see clean token {j} of block {j // B}: the encoder is "
                      f"block-causal, block(j) <= block(i): its own block and every earlier one")
    return False, (f"query {i} (block {i // B}) sees clean token {j} of the LATER block {j // B}: the encoder is "
                   f"block-causal, block(j) <= block(i) (or j in the prompt); at sampling time block {j // B} is "
                   f"not written yet")


def decoder_rule(valid, B, b, i, j, L):
    """Query i of the decoder (noisy x_t) may see key j of [h ; x_t] (j < L: clean h_j): (expected, why)."""
    clean, jj = j < L, j % L
    bi, bj = i // B, jj // B
    if not valid[b, i]:
        return (not clean and jj == i), (f"query {i} is padding: it sees only its own noisy key (column L + {i}), "
                                         f"no clean key")
    if not valid[b, jj]:
        return False, f"query {i} sees the {'clean' if clean else 'noisy'} key of padding token {jj}: never"
    if clean:
        if bj == bi:
            return False, (f"block {bi}'s queries see their own clean tokens (query {i}, clean key {jj}): the "
                           f"decoder would copy the answer it must predict; clean keys need block(j) < block(i)")
        if bj > bi:
            return False, (f"query {i} (block {bi}) sees clean h of the LATER block {bj}: clean keys need "
                           f"block(j) < block(i) (offset block-causal)")
        return True, (f"query {i} (block {bi}) does not see clean h_{jj} of the finished block {bj}: the decoder "
                      f"reads every earlier block through h (offset block-causal, block(j) < block(i))")
    if bj != bi:
        return False, (f"query {i} (block {bi}) sees the noisy x_t of block {bj}: noisy keys are block-diagonal, "
                       f"a block is denoised on its own (at sampling time the other blocks' noise does not exist)")
    return True, (f"query {i} (block {bi}) does not see the noisy x_t of its own block (key {jj}): noisy keys are "
                  f"block-diagonal, block(j) == block(i)")


def first_wrong(mask, rule, keys):
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            for j in range(keys):
                expected, why = rule(b, i, j)
                if bool(mask[b, i, j]) != expected:
                    return why
    return None


def test_encoder_mask_follows_the_rules():
    for prompt, valid, B in mask_cases():
        b, L = valid.shape
        mask = encoder_mask(prompt, valid, B)
        check_shape(mask, (b, L, L), "encoder_mask")
        why = first_wrong(mask, lambda b_, i, j: encoder_rule(prompt, valid, B, b_, i, j), L)
        assert why is None, f"encoder mask (L={L}, B={B}): {why}"


def test_decoder_mask_follows_the_rules():
    for _, valid, B in mask_cases():
        b, L = valid.shape
        mask = decoder_mask(valid, B)
        check_shape(mask, (b, L, 2 * L), "decoder_mask")
        why = first_wrong(mask, lambda b_, i, j: decoder_rule(valid, B, b_, i, j, L), 2 * L)
        assert why is None, f"decoder mask (L={L}, B={B}, keys [h ; x_t]): {why}"


# --- the loss ----------------------------------------------------------------------------

def test_loss_ignores_unmasked_tokens():
    g = torch.Generator().manual_seed(0)
    b, L = 2, 8
    x0 = torch.randint(0, 8, (b, L), generator=g)
    target = torch.ones(b, L, dtype=torch.bool)
    target[:, :2] = False  # the prompt
    masked = torch.zeros(b, L, dtype=torch.bool)
    masked[0, [2, 5]] = masked[1, 6] = True
    x_t = torch.where(masked, MASK, x0)
    alpha = torch.full((b, L), 0.75, dtype=torch.float64)
    alpha[:, 4:] = 0.5  # block 1 at t = 0.5, block 0 at t = 0.25 (linear schedule)
    nz = Noised(x_t, masked, alpha, -torch.ones(b, L, dtype=torch.float64))
    logits = torch.randn(b, L, V, generator=g)
    nelbo, ce, n, _ = diffusion_loss(logits, x0, nz, target, MASK)
    # by hand: SUBS gives [MASK] no mass; only masked targets count; w = -alpha'/(1 - alpha) = 1/t
    log_p = logits.index_fill(-1, torch.tensor([MASK]), -math.inf).log_softmax(-1)
    nll = lambda i, j: -log_p[i, j, x0[i, j]].item()  # noqa: E731
    assert int(n) == 12, f"n_targets = {int(n)}: the loss is averaged over every TARGET token (12 here: not the " \
                         f"prompt, masked or not), unmasked ones adding 0"
    hand_ce = (nll(0, 2) + nll(0, 5) + nll(1, 6)) / 12
    hand_nelbo = (4 * nll(0, 2) + 2 * nll(0, 5) + 2 * nll(1, 6)) / 12
    logits2 = logits.clone()
    logits2[~masked] = 10 * torch.randn(int((~masked).sum()), V, generator=g)
    nelbo2, ce2, _, _ = diffusion_loss(logits2, x0, nz, target, MASK)
    assert float(ce2) == float(ce) and float(nelbo2) == float(nelbo), \
        "the loss changed when only the logits at UNMASKED positions changed: SUBS carry-over makes p(x0_i | x_t) " \
        "= 1 where x_t is not [MASK], so unmasked tokens add exactly 0 to the loss (subs_log_probs)"
    assert abs(float(ce) - hand_ce) < 1e-4 * hand_ce, \
        f"masked_ce = {float(ce):.5f}, by hand {hand_ce:.5f}: sum over masked targets of -log p(x0_i | x_t) " \
        f"([MASK] given no mass: SUBS), divided by the number of target tokens"
    assert abs(float(nelbo) - hand_nelbo) < 1e-4 * hand_nelbo, \
        f"nelbo = {float(nelbo):.5f}, by hand {hand_nelbo:.5f}: each masked token of block k weighs " \
        f"w_k = -alpha'(t_k) / (1 - alpha(t_k)) (here 1/t: 4 in block 0, 2 in block 1)"


# --- the training forward and the training step -----------------------------------------------

def test_training_forward_sees_what_the_masks_allow():
    model = tiny()
    B = model.cfg.block_len
    _, x0, x_t, prompt_mask, P = random_layout(model)  # prompt blocks, then 3 answer blocks
    k = slice(P + B, P + 2 * B)  # the second answer block
    with torch.no_grad():
        ref = model.logits(x0, x_t, prompt_mask)
        assert tuple(ref.shape) == (*x0.shape, model.cfg.vocab_size), \
            f"logits must be (b, L, V) = {(*x0.shape, model.cfg.vocab_size)}, got {tuple(ref.shape)}"

        def block_k_after(x0_new=None, x_t_new=None):
            return model.logits(x0 if x0_new is None else x0_new, x_t if x_t_new is None else x_t_new,
                                prompt_mask)[:, k]

        changed = lambda out: not torch.allclose(out, ref[:, k], atol=1e-9)  # noqa: E731
        own = x0.clone()
        own[:, k] = (x0[:, k] + 1) % 200
        assert not changed(block_k_after(x0_new=own)), \
            "block k's logits changed when only ITS OWN clean tokens x_0 changed: the decoder sees the answer it " \
            "must predict (the leak); its clean keys h_j need block(j) < k (decoder_mask)"
        earlier = x0.clone()
        earlier[:, P:P + B] = (x0[:, P:P + B] + 1) % 200
        assert changed(block_k_after(x0_new=earlier)), \
            "block k's logits did not change when the finished block before it changed: the decoder must read " \
            "the clean blocks < k through h, as keys [h ; x_t] (the encoder over x_0, then decode against it)"
        prompt = x0.clone()
        prompt[:, P - 1] = (x0[:, P - 1] + 1) % 200
        assert changed(block_k_after(x0_new=prompt)), \
            "block k's logits did not change when the prompt changed: the encoder reads x_0 (prompt included) " \
            "and the decoder attends to its output h"
        noisy_other = x_t.clone()
        noisy_other[:, P:P + B] = model.cfg.mask_id  # block k - 1's noise
        assert not changed(block_k_after(x_t_new=noisy_other)), \
            "block k's logits changed when the NOISY tokens of another block changed: the decoder's noisy keys " \
            "are block-diagonal (at sampling time the other blocks are clean, not noisy)"
        noisy_own = x_t.clone()
        noisy_own[:, k] = model.cfg.mask_id
        assert changed(block_k_after(x_t_new=noisy_own)), \
            "block k's logits did not change when its own noisy tokens x_t changed: the decoder runs over x_t " \
            "(its queries and its own keys), the encoder over x_0"


def test_training_step_averages_over_targets():
    # with all-equal logits, SUBS spreads p over the V - 1 tokens that are not [MASK]: every
    # masked target costs log(V - 1) nats, every unmasked one 0
    model = tiny().train()
    V_model = model.cfg.vocab_size
    model.logits = lambda x0, x_t, prompt_mask: torch.zeros(*x_t.shape, V_model, dtype=torch.float64)
    _, x0, _, prompt_mask, P = random_layout(model)
    n_targets = int(((x0 != model.cfg.pad_id) & ~prompt_mask).sum())
    n_blocks = (x0.shape[1] - P) // model.cfg.block_len * x0.shape[0]  # answer blocks in the batch
    for seed in range(3):
        out = model(x0, prompt_mask, generator=torch.Generator().manual_seed(seed))
        assert int(out.n_targets) == n_targets, \
            f"n_targets = {int(out.n_targets)}, expected {n_targets}: every token that is neither prompt nor " \
            f"padding is a target (masked or not)"
        n_masked = float(out.masked_ce) * n_targets / math.log(V_model - 1)
        assert abs(n_masked - round(n_masked)) < 1e-6 and n_blocks <= round(n_masked) <= n_targets, \
            f"with uniform logits masked_ce * n_targets / log(V - 1) must count the masked targets (an integer, " \
            f"at least one per answer block: ensure_masked), got {n_masked:.3f}: draw x_t with q_sample, score " \
            f"the logits with diffusion_loss"
        assert float(out.nelbo) >= float(out.masked_ce) - 1e-9, \
            "nelbo < masked_ce: with the linear schedule each masked token weighs w = 1/t >= 1"
        assert float(out.loss) == float(out.masked_ce), "train_loss='masked_ce' (the default) trains masked_ce"


# --- one denoising step ---------------------------------------------------------------------

def test_remask_reveals_the_most_confident():
    g = torch.Generator().manual_seed(0)
    b, B = 4, 8
    logits = 3 * torch.randn(b, B, V, generator=g, dtype=torch.float64)
    logits[0, 3, MASK] = 50.0  # [MASK] the likeliest output here: SUBS gives it no mass
    x = torch.full((b, B), MASK)
    x[1, 0] = 5  # already decoded
    p = logits.index_fill(-1, torch.tensor([MASK]), -math.inf).softmax(-1)
    conf, pred = p.max(-1)
    # linear schedule, t = 0.75 -> s = 0.5: alpha 0.25 -> 0.5, floor((1 - 0.5) * 8) = 4 stay masked
    out = denoise_step(logits, x, 0.25, 0.5, MASK, "remask")
    assert tuple(out.shape) == (b, B), f"denoise_step returns the block x_s, (b, B), got {tuple(out.shape)}"
    assert out[1, 0] == 5, "an already decoded token changed: decoded tokens never change (SUBS carry-over)"
    assert (out != MASK).sum(1).tolist() == [4, 4, 4, 4], \
        f"[MASK] left per row: {(out == MASK).sum(1).tolist()}, expected 4: predict and remask keeps " \
        f"floor((1 - alpha_s) * B) = 4 masked (of B = 8), revealing the rest"
    for r in range(b):
        todo = x[r] == MASK
        want = conf[r].masked_fill(~todo, -1).topk(int((out[r] != MASK).sum() - (~todo).sum())).indices
        assert set(want.tolist()) == set(((out[r] != MASK) & todo).nonzero()[:, 0].tolist()), \
            f"row {r} revealed other positions than its most confident [MASK]: predict and remask reveals the " \
            f"tokens whose x_theta is most probable (confidence = p_theta(x_theta)) and re-masks the rest"
    revealed = (out != MASK) & (x == MASK)
    assert torch.equal(out[revealed], pred[revealed]), \
        "a revealed token is not the argmax of p_theta: x_theta = argmax at temperature 0, with [MASK] given no " \
        "mass (SUBS: logits[MASK] = -inf)"
    final = denoise_step(logits, x, 0.75, 1.0, MASK, "remask", final=True)
    assert not (final == MASK).any(), "final=True (the last step) must reveal every [MASK] left"


# --- the cached sampler ---------------------------------------------------------------------------

def test_cached_sampler_encodes_each_clean_token_once():
    model = tiny()
    B = model.cfg.block_len
    _, x0, x_t, prompt_mask, P = random_layout(model)  # P prompt positions, then 3 answer blocks
    with torch.no_grad():
        train_logits = model.logits(x0, x_t, prompt_mask)  # the training forward: what the sampler must give
    read = []  # positions each pass through the encoder reads
    hook = model.encoder[0].register_forward_hook(lambda module, args, out: read.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            runner = CachedE2D2(model, x0[:, :P])
            assert sum(read) == P, \
                f"starting the sampler ran the encoder over {sum(read)} positions: it must encode the prompt " \
                f"({P} positions, left-padded) exactly once and cache its keys/values"
            starts = list(range(P, x0.shape[1], B))
            for start in starts:
                k = start // B  # the block's number over the whole sequence (the prompt's blocks first)
                blk, before = slice(start, start + B), sum(read)
                for step in range(2):  # two denoising steps of block k
                    got = runner.logits(x_t[:, blk])
                assert sum(read) == before, \
                    f"the encoder ran during the denoising steps of block {k} (over {sum(read) - before} " \
                    f"positions): the noisy block never goes through the encoder; only the small decoder runs " \
                    f"at each step, against the cached clean keys/values (what makes E2D2 sample fast)"
                assert tuple(got.shape) == (x0.shape[0], B, model.cfg.vocab_size), \
                    f"logits(x_block) returns (b, B, V), got {tuple(got.shape)}"
                assert torch.allclose(got, train_logits[:, blk], atol=1e-10), \
                    f"block {k}'s logits differ from the training forward's: the decoder must see the cached " \
                    f"clean keys of the prompt and of blocks < {k} and the block's own noisy keys, nothing else, " \
                    f"at RoPE positions that continue from the cache"
                if start == starts[-1]:
                    break  # the last block is never encoded: nothing comes after it
                runner.finish_block(x0[:, blk])
                new = sum(read) - before
                assert new != 0, \
                    f"finish_block on block {k} never ran the encoder: block {k + 1}'s decoder cannot see " \
                    f"it (clean keys h_j for block(j) < {k + 1}); encode the finished block and add it to both caches"
                assert new == B, \
                    f"finish_block on block {k} ran the encoder over {new} positions: it must encode the " \
                    f"block's {B} new tokens once, against the cache, not re-read what is already cached"
    finally:
        hook.remove()
