"""Training end to end: the loss falls and sampled answers become correct; the scripts
run as a user runs them (flags, checkpoint, resume, sample.py, clear errors)."""
import math
import os
import re

import pytest
import torch

import data
import train
from conftest import run
from e2d2 import LossOptions, generate
from models import build_model


@pytest.mark.slow
def test_tiny_training_loss_falls_and_answers_become_correct(trained):
    losses = trained["losses"]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.25 * first, (first, last)
    assert trained["metrics"]["exact_match"] >= 0.6  # held-out sums, sampled with the cache
    # and the answers really are the sums
    tok = data.ByteTokenizer()
    ex = data.task_examples(data.get_task("addition", 2), "val", 32, seed=5)
    res = generate(trained["model"], [tok.encode(p) for p, _ in ex])
    assert sum(tok.decode(ids) == a for ids, (_, a) in zip(res.tokens, ex)) >= 16
    assert all(res.finished)  # every answer ended with [EOS]


@pytest.mark.slow
def test_trained_model_stops_each_sequence_after_its_eos_block(trained):
    # seq_len=20 leaves room for 3 answer blocks of 4; each row must leave the batch right
    # after the block in which it wrote [EOS]
    model, tok = trained["model"], data.ByteTokenizer()
    prompts = ["45+54=", "98+97=", "10+11=", "77+60="]
    blocks = {}
    res = generate(model, [tok.encode(p) for p in prompts], on_step=lambda k, i, rows, x: [
        blocks.setdefault(r, set()).add(k) for r in rows.tolist()])
    assert all(res.finished)
    for r, ids in enumerate(res.tokens):
        # blocks 0-1 hold the prompt (6 tokens, left-padded to 8): the answer's are 2, 3, ...
        assert blocks[r] == set(range(2, 2 + (len(ids) + 1 + 3) // 4))  # ceil((len + EOS) / B)


def test_train_script_sample_script_and_resume(tmp_path):
    out = str(tmp_path / "run")
    small = ["--d_model=32", "--n_enc=2", "--n_dec=1", "--batch_size=16", "--eval_examples=8",
             "--eval_batches=1", f"--out_dir={out}"]
    r = run("train.py", "--max_steps=20", "--eval_every=10", *small)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"final step=20 val_nelbo=\d+\.\d+ val_nelbo_se=\d+\.\d+ exact_match=\d\.\d+", last), last
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["step"] == 20 and ckpt["config"]["n_enc"] == 2 and ckpt["config"]["d_model"] == 32
    assert set(ckpt) >= {"config", "model", "optimizer", "step"}

    r = run("train.py", "--max_steps=30", "--eval_every=10", "--resume", *small)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 20" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("final step=30 ")

    ck = os.path.join(out, "ckpt.pt")
    r = run("sample.py", f"--ckpt={ck}", "123+456=", "5+5=")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("123+456=") and lines[1].startswith("5+5=")
    assert re.search(r"tokens/s; network calls \d+ \(decoder \d+, encoder \d+\)", lines[-1])
    r = run("sample.py", f"--ckpt={ck}", "--show", "1+1=")
    assert "block 1 step 1: 1+1=|" in r.stdout
    r = run("sample.py", f"--ckpt={ck}", stdin="7+8=\n\n1+2=\n")
    assert [l.split("=")[0] for l in r.stdout.splitlines()[:2]] == ["7+8", "1+2"]
    r = run("sample.py", f"--ckpt={ck}", "--num_examples=3")
    assert re.search(r"exact match: \d/3", r.stdout)


def test_resumed_run_equals_uninterrupted(tmp_path):
    def run_steps(out, steps, resume=False):
        tc = train.TrainConfig(out_dir=str(out), batch_size=16, max_steps=steps, eval_every=5,
                               eval_examples=4, eval_batches=1, resume=resume, digits=2)
        cfg, ckpt, _ = train.setup(tc, {} if resume else dict(d_model=32, n_enc=2, n_dec=1), "cpu")
        return train.train(cfg, tc, "cpu", ckpt)["model"]

    straight = run_steps(tmp_path / "a", 10)
    run_steps(tmp_path / "b", 5)
    resumed = run_steps(tmp_path / "b", 10, resume=True)
    for (n, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), n


def test_lr_at_warms_up_linearly_then_decays_by_cosine():
    tc = train.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert train.lr_at(0, tc) == pytest.approx(1e-4)  # lr * 1/10
    assert train.lr_at(4, tc) == pytest.approx(5e-4)
    assert train.lr_at(9, tc) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert train.lr_at(10, tc) == pytest.approx(1e-3)  # cosine starts at the peak ...
    assert train.lr_at(60, tc) == pytest.approx((1e-3 + 1e-4) / 2)  # ... is halfway at half ...
    assert train.lr_at(35, tc) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert train.lr_at(110, tc) == pytest.approx(1e-4) and train.lr_at(500, tc) == pytest.approx(1e-4)
    after = [train.lr_at(s, tc) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_train_loss_nelbo_is_what_training_minimises(tmp_path):
    # the first logged loss of a --train_loss=nelbo run is the NELBO of the first batch
    # under the first step's noise (rebuilt here the way train() seeds them)
    model_over, train_over = train.parse_args(["--train_loss=nelbo", "--digits=2", "--max_steps=1",
                                               "--batch_size=8", "--eval_examples=4", "--eval_batches=1",
                                               f"--out_dir={tmp_path}", "--d_model=32", "--n_enc=2", "--n_dec=1"])
    tc = train.training_config(train_over)
    assert tc.train_loss == "nelbo"
    cfg, _, dataset = train.setup(tc, model_over, "cpu")
    logged = train.train(cfg, tc, "cpu", None, dataset)["losses"][0]
    torch.manual_seed(tc.seed)
    model = build_model(cfg).train()
    batch = dataset.collate(dataset.train_examples(tc.batch_size, tc.seed, 0), cfg.block_len, cfg.seq_len)
    noise = lambda: torch.Generator().manual_seed(tc.seed * 7919)  # noqa: E731 (step 0, micro-batch 0)
    nelbo = model(batch.x0, batch.prompt_mask, noise(), LossOptions(train_loss="nelbo"))
    ce = model(batch.x0, batch.prompt_mask, generator=noise())
    assert nelbo.loss.item() == nelbo.nelbo.item() and ce.loss.item() == ce.masked_ce.item()
    assert logged == pytest.approx(nelbo.nelbo.item(), rel=1e-6)
    assert logged != pytest.approx(ce.masked_ce.item(), rel=1e-3)
    with pytest.raises(ValueError, match=r"train_loss must be one of \('masked_ce', 'nelbo'\)"):
        LossOptions(train_loss="ce")
