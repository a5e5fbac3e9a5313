"""The evaluation NELBO: an estimate of the bound under q(x_t | x_0) itself, over all of
t in [0, 1], with an honest standard error. Known value: a model whose logits are all
equal predicts uniformly over the V - 1 tokens that are not [MASK] (SUBS), so its NELBO is
(alpha(0) - alpha(1)) * log(V - 1) per token, i.e. log(V - 1) exactly for the linear, log
and power schedules and (1 - eps) log(V - 1) for cosine, whose alpha(0) = 1 - eps. Every
schedule in e2d2.SCHEDULES is checked, so a new one is tested the moment it is added.

Also: the answer metrics that sample.py --eval prints, BLEU and chrF, against the
`sacrebleu` package (optional: those tests are skipped without it), on varied pairs and on
the fine-tuning walk-through's test set."""
import math
import re

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


# --- BLEU and chrF as sacreBLEU computes them ---------------------------------------------

# (hypothesis, reference): what the 13a rules cut (punctuation, digits with periods, commas
# and hyphens, apostrophes, HTML entities, line breaks), and what they leave alone
VARIED = [
    ("The cat sat on the mat.", "The cat sat on the mat."),
    ("the cat, sat on a mat!", "The cat sat on the mat."),
    ("It's 3.5-4 km, isn't it?", "It is 3.5 - 4 km, isn't it?"),
    ("In 1990-2000 prices rose 1,000%.", "From 1990 to 2000, prices rose by 1,000 %."),
    ('well-known (and well-liked) "quotes"', "well known and well-liked 'quotes'"),
    ("", "an empty answer"),
    ("a.b,c 3.14 .5 5. x,1 1,x 2,3.4", "a . b , c 3.14 0.5 5 . x , 1"),
    ("f(x) = [1, 2]; g{y} <z> @home #tag $5 ~a ^b |c \\d `e` _f_ a/b a*b+c", "f(x) = [1,2]; g{y} <z> @home"),
    ("&quot;quoted&quot; &amp; &lt;tag&gt; &amp;quot;", '"quoted" & <tag>'),
    ("a line-\nbreak and\nnewline<skipped>", "a linebreak and newline"),
    ("trailing spaces   \t", "  trailing spaces"),
    ("naïve café — “smart quotes” don’t", 'naive café - "smart quotes" don\'t'),
    ("x-", "x -"),
    ("x-\n", "x"),
    ("one", "one"),
    ("Th bjcts rtrnd by \"dct.kys()\",", 'The objects returned by "dict.keys()",'),
]


def sacre(hyps, refs):
    """sacrebleu's corpus BLEU and chrF, default settings, in [0, 1]."""
    sacrebleu = pytest.importorskip("sacrebleu")
    return sacrebleu.corpus_bleu(hyps, [refs]).score / 100, sacrebleu.corpus_chrf(hyps, [refs]).score / 100


def test_13a_words_by_hand():
    assert data.tokenize_13a("It's 3.5-4 km, isn't it?") == ["It's", "3.5", "-", "4", "km", ",", "isn't", "it", "?"]
    assert data.tokenize_13a("end. a,b 1,000 well-known") == ["end", ".", "a", ",", "b", "1,000", "well-known"]
    assert data.tokenize_13a("a &amp; b\nc-\nd") == ["a", "&", "b", "cd"]  # a hyphenated line break joins
    assert data.tokenize_13a("   ") == [] and data.tokenize_13a("") == []


def test_bleu_and_chrf_equal_sacrebleu_on_varied_pairs():
    hyps, refs = [h for h, _ in VARIED], [r for _, r in VARIED]
    bleu, chrf = sacre(hyps, refs)
    assert 0 < bleu < 1 and 0 < chrf < 1  # a corpus where both figures mean something
    assert data.corpus_bleu(hyps, refs) == pytest.approx(bleu, rel=1e-9, abs=1e-12)
    assert data.chrf(hyps, refs) == pytest.approx(chrf, rel=1e-9, abs=1e-12)
    # tokenize="none" is sacreBLEU's tokenize="none" (the whitespace words)
    sacrebleu = pytest.importorskip("sacrebleu")
    none = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score / 100
    assert data.corpus_bleu(hyps, refs, tokenize="none") == pytest.approx(none, rel=1e-9)
    assert abs(none - bleu) > 0.01  # the two tokenizations really differ on this corpus
    for h, r in VARIED:  # each pair alone: short corpora, missing orders, empty answers
        bleu, chrf = sacre([h], [r])
        assert data.corpus_bleu([h], [r]) == pytest.approx(bleu, rel=1e-9, abs=1e-12), (h, r)
        assert data.chrf([h], [r]) == pytest.approx(chrf, rel=1e-9, abs=1e-12), (h, r)
    with pytest.raises(ValueError, match="tokenize must be one of"):
        data.corpus_bleu(hyps, refs, tokenize="13A")


def vowels_answers(pairs):
    """Deterministic damaged answers to the vowels task, from nothing to everything right:
    the prompts themselves (the vowel-less phrases), every other word's vowels put back, the
    first half of each phrase right, the phrase without its last word, nothing at all, and
    the references themselves."""
    strip = lambda w: re.sub("[aeiouAEIOU]", "", w)  # noqa: E731  (the task's damage)
    refs = [t for _, t in pairs]
    every_other = [" ".join(w if i % 2 else strip(w) for i, w in enumerate(t.split())) for t in refs]
    first_half = [" ".join(w if i < len(t.split()) // 2 else strip(w) for i, w in enumerate(t.split()))
                  for t in refs]
    return {"prompts": [s for s, _ in pairs], "every_other_word": every_other, "first_half": first_half,
            "last_word_dropped": [t.rsplit(" ", 1)[0] for t in refs], "empty": [""] * len(refs),
            "references": refs,
            "mixed": [[s, eo, fh, t, ""][i % 5] for i, (s, eo, fh, t) in
                      enumerate(zip([s for s, _ in pairs], every_other, first_half, refs))]}


def test_bleu_and_chrf_equal_sacrebleu_on_the_finetuning_test_set():
    pytest.importorskip("sacrebleu")
    pairs = data.pydoc_task_pairs("test")  # the walk-through's vowels_test.jsonl, in memory
    assert len(pairs) > 200
    refs = [t for _, t in pairs]
    for name, hyps in vowels_answers(pairs).items():
        bleu, chrf = sacre(hyps, refs)
        assert data.corpus_bleu(hyps, refs) == pytest.approx(bleu, rel=1e-9, abs=1e-12), name
        assert data.chrf(hyps, refs) == pytest.approx(chrf, rel=1e-9, abs=1e-12), name
        assert round(100 * data.corpus_bleu(hyps, refs), 2) == round(100 * bleu, 2), name  # as printed
