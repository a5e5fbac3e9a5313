"""One reverse step (e2d2.denoise_step) against its definitions: the ancestral reveal
probability, the remask count of a non-linear schedule, the confidence threshold and
temperature sampling. Expected values are computed here from the formulas, not by the code."""
import math

import pytest
import torch

from e2d2 import ModelConfig, denoise_step, generate
from models import build_model

V, MASK = 260, 259


def all_masked(b, B):
    return torch.full((b, B), MASK, dtype=torch.long)


@pytest.mark.parametrize("schedule,alpha", [
    ("linear", lambda t: 1 - t),
    ("cosine", lambda t: (1 - 1e-3) * math.cos(math.pi * t / 2)),
    ("log", lambda t: 1 - math.log1p(t) / math.log(2)),
])
def test_ancestral_reveal_probability(schedule, alpha):
    # q(x_s | x_t, x_theta): each [MASK] is revealed with probability
    # (alpha_s - alpha_t) / (1 - alpha_t), independently
    b, B, t, s = 2000, 8, 0.7, 0.4
    logits = torch.randn(b, B, V, generator=torch.Generator().manual_seed(0))
    x = all_masked(b, B)
    x[:, 0] = 65  # an already decoded token never changes
    out = denoise_step(logits, x, alpha(t), alpha(s), MASK, "ancestral",
                       generator=torch.Generator().manual_seed(1))
    p = (alpha(s) - alpha(t)) / (1 - alpha(t))
    rate = (out[:, 1:] != MASK).double().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / (b * (B - 1))), (rate, p)
    assert (out[:, 0] == 65).all()
    revealed = out != MASK
    revealed[:, 0] = False
    # temperature 0: a revealed token is the argmax of x_theta (never [MASK])
    lp = logits.clone()
    lp[..., MASK] = -math.inf
    assert torch.equal(out[revealed], lp.argmax(-1)[revealed])


@pytest.mark.parametrize("schedule,expected", [
    # 16 tokens, T = 4, s = 0.75, 0.5, 0.25, 0: floor((1 - alpha(s)) * 16) stay masked
    ("cosine", [math.floor((1 - (1 - 1e-3) * math.cos(math.pi * s / 2)) * 16) for s in (0.75, 0.5, 0.25)] + [0]),
    ("log", [math.floor(math.log1p(s) / math.log(2) * 16) for s in (0.75, 0.5, 0.25)] + [0]),
])
def test_remask_count_follows_a_non_linear_schedule(schedule, expected):
    assert expected in ([9, 4, 1, 0], [12, 9, 5, 0])  # (the linear schedule would be 12, 8, 4, 0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(schedule=schedule, seq_len=32, block_len=16, d_model=32,
                                    n_heads=4, n_enc=2, n_dec=1)).eval()
    seen = []
    generate(model, [[1, 2, 3]], max_new_tokens=16, steps=4,
             on_step=lambda k, i, rows, x: seen.append(int((x == MASK).sum())))
    assert seen == expected


def test_confidence_threshold_reveals_at_least_what_the_schedule_reveals():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(64, 8, V, generator=g)
    x = all_masked(64, 8)
    x[:, :2] = 70  # partly decoded already
    # linear schedule, t = 0.75 -> s = 0.5: alpha 0.25 -> 0.5
    plain = denoise_step(logits, x, 0.25, 0.5, MASK, "remask")
    thresholded = denoise_step(logits, x, 0.25, 0.5, MASK, "remask", confidence_threshold=0.7)
    by_schedule, with_threshold = plain != MASK, thresholded != MASK
    assert (with_threshold | ~by_schedule).all()  # a superset of the schedule's reveals
    assert torch.equal(thresholded[by_schedule], plain[by_schedule])  # the same tokens there
    lp = logits.clone()
    lp[..., MASK] = -math.inf
    confident = (lp.softmax(-1).max(-1).values > 0.7) & (x == MASK)
    assert with_threshold[confident].all()  # every confident [MASK] is revealed ...
    assert not (with_threshold & ~by_schedule & ~confident).any()  # ... and nothing else extra
    # (here the threshold did reveal more, and the schedule revealed unconfident tokens too)
    assert (with_threshold & ~by_schedule).any() and (by_schedule & ~confident & (x == MASK)).any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_temperature_sampling_draws_from_softmax_of_logits_over_temperature(temperature):
    p = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.full((20000, 1, V), -1e9)
    logits[..., 10:13] = p.log()
    x = all_masked(20000, 1)
    out = denoise_step(logits, x, 0.0, 1.0, MASK, "remask", temperature,
                       generator=torch.Generator().manual_seed(0), final=True)
    q = p ** (1 / temperature)
    q = q / q.sum()  # softmax(log p / T)
    freq = torch.stack([(out == k).double().mean() for k in (10, 11, 12)])
    assert torch.allclose(freq, q.double(), atol=4 * math.sqrt(0.25 / 20000))
    greedy = denoise_step(logits, x, 0.0, 1.0, MASK, "remask", 0.0, final=True)
    assert (greedy == 10).all()


def test_margin_reveals_the_widest_gap_where_remask_reveals_the_likeliest_token():
    # Two [MASK] positions of one block, one to reveal (linear schedule, t = 1 -> s = 0.5:
    # floor(0.5 * 2) = 1 stays masked). Position 0 is likelier (p1 = 0.50) but torn between
    # two tokens (p2 = 0.45, margin 0.05); position 1 is less likely (p1 = 0.40) but its
    # runner-up is far behind (p2 = 0.10, margin 0.30). "remask" ranks by p1, "margin" by
    # p1 - p2: a strategy that sees the whole distribution, one entry in STRATEGIES.
    probs = torch.full((1, 2, V), 0.0)
    probs[0, 0, [10, 11, 12]] = torch.tensor([0.50, 0.45, 0.05])
    probs[0, 1, [20, 21, 22, 23, 24, 25, 26]] = torch.tensor([0.40, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10])
    logits = probs.clamp(min=1e-12).log()
    x = all_masked(1, 2)
    assert denoise_step(logits, x, 0.0, 0.5, MASK, "remask").tolist() == [[10, MASK]]
    assert denoise_step(logits, x, 0.0, 0.5, MASK, "margin").tolist() == [[MASK, 20]]
