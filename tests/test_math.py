"""Noise schedules, the forward process q(x_t | x_0), SUBS and the loss."""
import math

import pytest
import torch

from e2d2 import (SCHEDULES, Noised, diffusion_loss, loss_weight, noise_schedule, q_sample,
                  sample_t, subs_log_probs)

MASK = 9


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_pair_order_and_derivative(name):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    alpha, alpha_prime = noise_schedule(name, t)
    # order: (alpha_t, alpha_prime_t). alpha is a probability that falls with t ...
    assert ((alpha >= 0) & (alpha <= 1)).all()
    assert (alpha[1:] < alpha[:-1]).all()
    # ... and alpha_prime is its derivative (central finite difference), hence negative
    h = 1e-6
    fd = (noise_schedule(name, t + h)[0] - noise_schedule(name, t - h)[0]) / (2 * h)
    assert torch.allclose(alpha_prime, fd, atol=1e-6)
    assert (alpha_prime < 0).all()
    # the ends: alpha(0) ~ 1 (clean), alpha(1) ~ 0 (all masked)
    a0 = noise_schedule(name, torch.tensor(0.0, dtype=torch.float64))[0].item()
    a1 = noise_schedule(name, torch.tensor(1.0, dtype=torch.float64))[0].item()
    assert a0 == pytest.approx(1.0, abs=2e-3) and a1 == pytest.approx(0.0, abs=1e-6)


def test_known_values():
    t = torch.tensor([0.25], dtype=torch.float64)
    assert noise_schedule("linear", t)[0].item() == pytest.approx(0.75)
    assert noise_schedule("linear", t)[1].item() == pytest.approx(-1.0)
    assert noise_schedule("power", t)[0].item() == pytest.approx(1 - 0.25**2)
    assert noise_schedule("log", t)[0].item() == pytest.approx(1 - math.log(1.25) / math.log(2))
    assert noise_schedule("cosine", t)[0].item() == pytest.approx((1 - 1e-3) * math.cos(math.pi / 8))
    # linear NELBO weight -alpha'/(1-alpha) = 1/t
    a, ap = noise_schedule("linear", t)
    assert loss_weight(a, ap).item() == pytest.approx(4.0)


def test_sample_t_range():
    t = sample_t(64, 8, 0.3, 0.6, torch.Generator().manual_seed(0))
    assert t.shape == (64, 8) and t.min() >= 0.3 and t.max() <= 0.6
    assert t.std() > 0.05  # one t per block, not one per sequence
    assert not torch.equal(t[:, 0], t[:, 1])


def test_training_weights_are_exact_at_small_t():
    # exp schedule: alpha = 1 - t^2, so -alpha'/(1 - alpha) = 2t / t^2 = 2/t exactly. At
    # t_min = 1e-3, 1 - alpha = 1e-6, which float32 stores with a ~6% error in the weight.
    t = sample_t(16, 4, 1e-3, 2e-3, torch.Generator().manual_seed(0))
    alpha, alpha_prime = noise_schedule("power", t)
    assert torch.allclose(loss_weight(alpha, alpha_prime), 2.0 / t.double(), rtol=1e-9)


def test_t_min_zero_is_refused():
    from e2d2 import ModelConfig
    with pytest.raises(ValueError, match="0 < t_min"):  # weight 1/(1 - alpha(0)) = inf
        ModelConfig(t_min=0.0)


def make_x0(b=32, L=16, n_prompt=5):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 8, (b, L), generator=g)
    prompt = torch.zeros(b, L, dtype=torch.bool)
    prompt[:, :n_prompt] = True
    return x0, prompt


def test_forward_process_never_masks_prompt_and_fills_every_block():
    x0, prompt = make_x0()
    target = ~prompt
    target[:, -3:] = False  # some padding too
    g = torch.Generator().manual_seed(1)
    t = torch.full((32, 4), 1e-4)  # alpha ~ 1: almost nothing would be masked by chance
    nz = q_sample(x0, target, t, 4, MASK, "linear", ensure_masked=True, generator=g)
    assert torch.equal(nz.x_t[~target], x0[~target])  # prompt/padding untouched
    assert (nz.x_t == MASK).equal(nz.masked)
    per_block = (nz.x_t == MASK).view(32, 4, 4).sum(-1)
    has_target = target.view(32, 4, 4).any(-1)
    assert (per_block[has_target] >= 1).all()
    assert (per_block[~has_target] == 0).all()
    # without the re-mask nearly nothing is masked at t ~ 0
    nz2 = q_sample(x0, target, t, 4, MASK, "linear", ensure_masked=False, generator=g)
    assert nz2.masked.sum() <= 2


def test_forward_process_masking_rate_is_one_minus_alpha():
    x0 = torch.zeros(4000, 8, dtype=torch.long)
    target = torch.ones_like(x0, dtype=torch.bool)
    t = torch.tensor([[0.2, 0.7]]).expand(4000, 2)
    nz = q_sample(x0, target, t, 4, MASK, "linear", ensure_masked=False,
                  generator=torch.Generator().manual_seed(0))
    rates = nz.masked.float().view(4000, 2, 4).mean((0, 2))
    assert rates[0].item() == pytest.approx(0.2, abs=0.02)
    assert rates[1].item() == pytest.approx(0.7, abs=0.02)
    assert torch.allclose(nz.alpha_t[0], torch.tensor([0.8] * 4 + [0.3] * 4))


def test_subs_zero_mask_mass_and_carry_over():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 10)
    x_t = torch.tensor([[MASK, 3, MASK, 7, 1], [2, MASK, MASK, MASK, 0]])
    logp = subs_log_probs(logits, x_t, MASK)
    p = logp.exp()
    assert torch.allclose(p.sum(-1), torch.ones(2, 5))
    assert (p[..., MASK] == 0).all()
    unmasked = x_t != MASK
    assert torch.equal(p[unmasked].argmax(-1), x_t[unmasked])
    assert (p[unmasked].max(-1).values == 1).all()


def test_loss_counts_only_masked_targets_with_nelbo_weights():
    torch.manual_seed(0)
    b, L, V = 2, 8, 10
    x0 = torch.randint(0, 8, (b, L))
    target = torch.ones(b, L, dtype=torch.bool)
    target[:, :2] = False  # prompt
    masked = torch.zeros(b, L, dtype=torch.bool)
    masked[0, [2, 5]] = True
    masked[1, [6]] = True
    x_t = torch.where(masked, MASK, x0)
    alpha = torch.full((b, L), 0.75)
    alpha[:, 4:] = 0.5  # second block: t = 0.5
    alpha_prime = -torch.ones(b, L)
    nz = Noised(x_t, masked, alpha, alpha_prime)
    logits = torch.randn(b, L, V)
    nelbo, ce, n, _ = diffusion_loss(logits, x0, nz, target, MASK)

    logp = subs_log_probs(logits, x_t, MASK)
    nll = lambda i, j: -logp[i, j, x0[i, j]].item()  # noqa: E731
    assert n.item() == 12
    assert ce.item() == pytest.approx((nll(0, 2) + nll(0, 5) + nll(1, 6)) / 12, rel=1e-5)
    w1, w2 = 1 / 0.25, 1 / 0.5  # -alpha'/(1-alpha)
    assert nelbo.item() == pytest.approx((w1 * nll(0, 2) + w2 * nll(0, 5) + w2 * nll(1, 6)) / 12, rel=1e-5)

    # the logits at unmasked positions do not matter at all (carry-over)
    logits2 = logits.clone()
    logits2[~masked] = torch.randn_like(logits2[~masked]) * 10
    nelbo2, ce2, _, _ = diffusion_loss(logits2, x0, nz, target, MASK)
    assert nelbo2.item() == nelbo.item() and ce2.item() == ce.item()
    # ... while those at masked positions do
    logits3 = logits.clone()
    logits3[0, 2] += torch.randn(V)
    assert diffusion_loss(logits3, x0, nz, target, MASK)[1].item() != ce.item()
