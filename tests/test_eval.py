"""The evaluation NELBO: an estimate of the bound under q(x_t | x_0) itself, over all of
t in [0, 1], with an honest standard error. Known value: a model whose logits are all
equal predicts uniformly over the V - 1 tokens that are not [MASK] (SUBS), so its NELBO is
(alpha(0) - alpha(1)) * log(V - 1) per token, i.e. log(V - 1) exactly for the linear, log
and power schedules and (1 - eps) log(V - 1) for cosine, whose alpha(0) = 1 - eps. Every
schedule in e2d2.SCHEDULES is checked, so a new one is tested the moment it is added."""
import math

import pytest
import torch

import data
import e2d2
from e2d2 import SCHEDULES, ModelConfig, noise_schedule
from models import MODELS, build_model, eval_nelbo, ratio_estimate


def uniform_model(name, schedule, **kw):
    """A model whose logits are all zero (the network is bypassed)."""
    cfg = ModelConfig(**{**dict(model=name, seq_len=32, block_len=4, d_model=32, n_heads=4, n_enc=2,
                                n_dec=1, schedule=schedule), **kw})
    model = build_model(cfg)
    model.logits = lambda x0, x_t, prompt_mask: torch.zeros(*x_t.shape, cfg.vocab_size)
    return model


def heldout(n_batches=4, b=64, L=32, n_prompt=8):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (n_batches * b, L), generator=g)
    prompt = torch.zeros_like(x0, dtype=torch.bool)
    prompt[:, :n_prompt] = True
    return [(x0[i:i + b], prompt[i:i + b]) for i in range(0, n_batches * b, b)]


def exact_uniform_nelbo(schedule, V=260):
    a = lambda t: noise_schedule(schedule, torch.tensor(t, dtype=torch.float64))[0].item()  # noqa: E731
    return (a(0.0) - a(1.0)) * math.log(V - 1)


@pytest.mark.parametrize("schedule", SCHEDULES)  # every schedule there is
@pytest.mark.parametrize("name", [n for n, spec in MODELS.items() if not spec.cls.exact_likelihood])  # diffusion ones
def test_uniform_logits_give_log_v_minus_1(name, schedule):
    model = uniform_model(name, schedule)
    est = eval_nelbo(model, heldout(), draws=4, generator=torch.Generator().manual_seed(1))
    value, se = est.per_token()
    expected = exact_uniform_nelbo(schedule)  # log(259) = 5.5568 (cosine: 5.5513)
    assert 0 < se < 0.3  # a standard error small enough for the check to mean something
    assert abs(value - expected) < 3 * se, (value, se, expected)


def test_training_noise_would_not_estimate_the_bound():
    # the training forward (t clipped to [t_min, t_max], empty blocks re-masked) is not
    # the bound: with t_min=1e-3 its 1/t-weighted re-masked tokens inflate it far past
    # log(V - 1); the evaluation estimate is what the scripts must use
    model = uniform_model("e2d2", "linear")
    g = torch.Generator().manual_seed(0)
    train_values = [model(x0, p, generator=g).nelbo.item() for x0, p in heldout()]
    assert sum(train_values) / len(train_values) > 2 * math.log(259)


def test_clipped_training_range_still_evaluates_the_full_bound(monkeypatch):
    # trained on t in [0.3, 0.8] (BD3-LM's clipped schedule); evaluation must still draw t
    # over all of [0, 1] and x_t from q exactly (no re-masking)
    model = uniform_model("e2d2", "log", t_min=0.3, t_max=0.8)
    seen = []
    real_q_sample = e2d2.q_sample

    def spy(x0, target_mask, t, *args, ensure_masked=True, **kw):
        seen.append((t.clone(), ensure_masked))
        return real_q_sample(x0, target_mask, t, *args, ensure_masked=ensure_masked, **kw)

    monkeypatch.setattr(e2d2, "q_sample", spy)
    est = eval_nelbo(model, heldout(), draws=2, generator=torch.Generator().manual_seed(2))
    t = torch.cat([s[0].flatten() for s in seen])
    assert not any(s[1] for s in seen)  # never re-masked
    assert t.min() < 1e-3 and t.max() > 0.99  # the whole range, not [0.3, 0.8]
    # the mask probability u = 1 - alpha(t) = v^2 with v stratified over [0, 1] (the log
    # schedule masks from u = 0 to 1): P(t < 0.09) = P(v < sqrt(1 - alpha(0.09)))
    expected = math.sqrt(1 - noise_schedule("log", torch.tensor(0.09, dtype=torch.float64))[0].item())
    assert (t < 0.09).double().mean().item() == pytest.approx(expected, abs=0.01)
    value, se = est.per_token()
    assert abs(value - math.log(259)) < 3 * se
    # ... while training keeps to its range
    seen.clear()
    model(*heldout(1)[0], generator=torch.Generator().manual_seed(0))
    assert seen[0][1] and 0.3 <= seen[0][0].min() and seen[0][0].max() <= 0.8


def test_ar_nll_is_exact_and_needs_no_draws():
    model = build_model(ModelConfig(model="ar", seq_len=32, d_model=32, n_heads=4, n_enc=2))
    model.logits = lambda x, *a, **k: (torch.zeros(*x.shape, 260), None)
    est = eval_nelbo(model, heldout(), draws=5)
    value, se = est.per_token()
    assert value == pytest.approx(math.log(260)) and se == pytest.approx(0.0, abs=1e-12)
    assert est.seq_tokens.tolist() == [32 - 8] * 256  # the first answer token has a prediction


def test_ratio_estimate_by_hand():
    # R = 6 / 4; residuals num - R den = (-0.5, 0.5, 0); SE^2 = 0.5 / (3 * 2) / (4/3)^2
    value, se = ratio_estimate(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 2.0]))
    assert value == 1.5 and se == pytest.approx(math.sqrt(0.5 / 6) / (4 / 3))


def test_text_figures_per_byte_and_bits():
    model = uniform_model("e2d2", "linear")
    windows = torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(3))
    batches = [(windows, torch.zeros_like(windows, dtype=torch.bool))]
    est = eval_nelbo(model, batches, draws=2, generator=torch.Generator().manual_seed(0),
                     bytes_per_token=data.ByteTokenizer().bytes_per_token())
    f = est.figures()
    assert est.seq_bytes.tolist() == [32] * 64  # every byte of a window is scored
    assert f["nelbo_per_byte"] == pytest.approx(f["nelbo_per_token"])  # byte tokens
    assert f["bits_per_byte"] == pytest.approx(f["nelbo_per_byte"] / math.log(2))
    assert f["bits_per_byte_se"] == pytest.approx(f["nelbo_per_byte_se"] / math.log(2))
    assert f["ppl_bound"] == pytest.approx(math.exp(f["nelbo_per_token"]))
    # specials are not bytes: with [EOS] targets the per-byte figure divides by fewer units
    x0 = windows.clone()
    x0[:, -4:] = data.EOS
    est = eval_nelbo(model, [(x0, batches[0][1])], draws=1, generator=torch.Generator().manual_seed(0),
                     bytes_per_token=data.ByteTokenizer().bytes_per_token())
    assert est.seq_bytes.tolist() == [28] * 64 and est.seq_tokens.tolist() == [32] * 64
