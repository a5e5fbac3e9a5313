"""The benchmarks' analytic costs are exact counts of what the code runs, and both
benchmarks run end to end at tiny sizes (their speed is measured by running them, not
asserted here)."""
import json
import subprocess
import sys

import pytest
import torch

import bench
import models
from conftest import ROOT, LayerCounter, random_layout, tiny
from e2d2 import ModelConfig, generate
from models import build_model


# every model of the registry, with and without its cache (the benchmarks' variants among them)
@pytest.mark.parametrize("name,use_cache", [(n, c) for n in models.MODELS for c in (True, False)])
def test_sampling_cost_counts_what_the_sampler_runs(name, use_cache):
    P, A, B, T, n_enc, n_dec = 8, 16, 4, 3, 3, 2
    cfg = ModelConfig(model=name, seq_len=P + A, block_len=B, d_model=32, n_heads=4, n_enc=n_enc, n_dec=n_dec)
    model = build_model(cfg).eval()
    steps = bench.steps_per_own_block(model, P, A, B, T)  # MDLM: A / B * T steps on its one block
    counter = LayerCounter(model)
    r = generate(model, [[7] * P, [9] * P], max_new_tokens=A, steps=steps, use_cache=use_cache, stop_at_eos=False)
    counter.remove()
    layer_tokens, layer_calls = bench.sampling_cost(name, use_cache, P, A, B, T, n_enc, n_dec)
    assert counter.tokens == pytest.approx(layer_tokens * A)
    assert counter.calls == pytest.approx(layer_calls * A)
    assert all(len(t) == A for t in r.tokens)


def test_each_sampler_gets_as_many_steps_as_the_block_models():
    P, A, B, T = 8, 16, 4, 3  # block models: T per block; MDLM: all K T on its one block; AR: one per token
    got = {name: bench.steps_per_own_block(tiny(name, seq_len=24), P, A, B, T) for name in ("e2d2", "bd3lm", "mdlm", "ar")}
    assert got == {"e2d2": T, "bd3lm": T, "mdlm": A // B * T, "ar": 1}


@pytest.mark.parametrize("name", models.MODEL_TYPES)
def test_training_cost_counts_layer_passes(name):
    cfg = ModelConfig(model=name, seq_len=16, block_len=4, d_model=32, n_heads=4, n_enc=3, n_dec=2)
    model = build_model(cfg)
    counter = LayerCounter(model)
    x0 = torch.randint(0, 200, (2, 16))
    prompt = torch.zeros_like(x0, dtype=torch.bool)
    prompt[:, :4] = True
    model(x0, prompt)
    assert counter.tokens == bench.training_cost(cfg) * 16


@pytest.mark.parametrize("name,decoder", [(n, "hidden") for n in models.MODEL_TYPES] + [("e2d2", "shared_kv")])
def test_flops_count_equals_torchs_flop_counter(name, decoder):
    # The analytic count (models.train_flops_per_token, for MFU) against an independent one:
    # torch's FlopCounterMode around a real forward and backward, which counts every matrix
    # multiply as it is dispatched (2 FLOPs per multiply-add) and nothing else. Both leave
    # out the same things (norms, softmax, RoPE, SiLU, elementwise ops), so they must agree
    # exactly. The CPU's fused attention kernel has no FLOP formula in FlopCounterMode, so
    # attention runs on the "math" backend: the same scores and weighted sum as two batched
    # matmuls, which it counts (dense: masked-out pairs too, as the analytic count does).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(model=name, decoder=decoder, seq_len=24, block_len=4, d_model=32, n_heads=4, n_enc=3, n_dec=2)
    model = build_model(cfg)
    x0 = torch.randint(0, 200, (2, 16))  # L = 16 < seq_len: MDLM pads to its 24-token canvas
    prompt = torch.zeros_like(x0, dtype=torch.bool)
    prompt[:, :4] = True
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = model(x0, prompt).loss
        forward = counter.get_total_flops()
        loss.backward()
    tokens = x0.numel()
    assert forward == model.flops_per_token(16) * tokens > 0  # tolerance: none
    # the backward multiplies twice what the forward did, in every layer that reaches the loss
    # (train_flops_per_token: 3 x forward). shared_kv's top encoder layer reaches it through its
    # keys/values only: its attention, output projection and MLP run forward, nothing reads them,
    # and autograd skips their backward (the fused q/k/v product is used, so it is not skipped)
    top = model.encoder[-1] if decoder == "shared_kv" else None
    skipped = 0 if top is None else 2 * (top.flops(16) - 2 * top.attn.qkv.weight.numel()) * tokens
    assert counter.get_total_flops() == models.train_flops_per_token(model, 16) * tokens - skipped


def test_training_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "train.json"
    rows = bench.bench_training(2, 1, "cpu", dict(d_model=32, n_enc=2, n_dec=1, seq_len=24), str(out))
    assert [r["model"] for r in rows] == list(models.MODEL_TYPES)
    assert all(r["tokens_per_s"] > 0 and r["activation_mib"] > 0 for r in rows)
    bd3 = next(r for r in rows if r["model"] == "bd3lm")
    assert bd3["analytic_ratio"] == pytest.approx(4 / 3)  # 2N / (N_enc + N_dec)
    assert json.loads(out.read_text())["rows"][0]["model"] == "e2d2"
    assert "E2D2 speed-up" in capsys.readouterr().out


def test_sampling_benchmark_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BENCH", dict(prompt=4, answer=8, d_model=32, n_heads=4, n_enc=2,
                                              n_dec=1, block_len=4, steps=2))
    out = tmp_path / "sample.json"
    rows = bench.bench_sampling([1, 2], 1, "cpu", str(out))
    assert len(rows) == 2 * len(bench.BENCH_VARIANTS)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    e2d2 = next(r for r in rows if r["variant"] == "e2d2 cached" and r["batch"] == 2)
    assert e2d2["network_calls"] == 2 * 2  # K = 2 blocks, T = 2 steps
    # every other variant's speed-up is E2D2 cached's tokens/s over its own, and its
    # analytic ratios are the sampling_cost counts of the two variants
    for r in rows:
        ref = next(q for q in rows if q["variant"] == "e2d2 cached" and q["batch"] == r["batch"])
        assert r["speedup_measured"] == pytest.approx(ref["tokens_per_s"] / r["tokens_per_s"])
        name, cache = next((m, c) for v, m, c in bench.BENCH_VARIANTS if v == r["variant"])
        ops, calls = bench.sampling_cost(name, cache, 4, 8, 4, 2, 2, 1)
        ref_ops, ref_calls = bench.sampling_cost("e2d2", True, 4, 8, 4, 2, 2, 1)
        assert r["speedup_analytic_tokens"] == pytest.approx(ops / ref_ops)
        assert r["speedup_analytic_calls"] == pytest.approx(calls / ref_calls)
    no_cache = next(r for r in rows if r["variant"] == "e2d2 no cache" and r["batch"] == 2)
    assert no_cache["encoder_calls"] == no_cache["network_calls"] > e2d2["encoder_calls"]
    assert len(json.loads(out.read_text())["rows"]) == len(rows)


def test_speedup_benchmark_against_a_commit(tmp_path, monkeypatch, root):
    # the committed code (HEAD) against the working tree, at tiny sizes: both sides load,
    # get the same weights and generate the same tokens; the limits follow the counts
    if subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    monkeypatch.setattr(bench, "BENCH", dict(prompt=4, answer=8, d_model=32, n_heads=4, n_enc=2,
                                              n_dec=1, block_len=4, steps=2))
    out = tmp_path / "speedup.json"
    rows = bench.bench_speedup("HEAD", [2], 1, str(out))
    assert {r["sampler"] for r in rows} == {"e2d2", "bd3lm", "ar"}
    assert all(r["same_tokens"] and r["old_tokens_per_s"] > 0 and r["new_tokens_per_s"] > 0 for r in rows)
    e2d2 = next(r for r in rows if r["sampler"] == "e2d2")
    # E2D2 cached, P=4, A=8, B=4, T=2: encoder on the prompt and 1 block (2 layers each),
    # decoder 2 blocks x 2 steps (1 layer each): 8 layer calls; 4*2 + 4*2 + 2*2*4 = 32
    # layer-tokens per row, so the average call multiplies batch 2 x 32 / 8 = 8 rows
    assert e2d2["layer_calls"] == 8 and e2d2["tokens_per_call"] == pytest.approx(8)
    assert e2d2["old_layer_call_s"] * 8 == pytest.approx(2 * 8 / e2d2["old_tokens_per_s"])
    saved = json.loads(out.read_text())
    assert saved["against"] == "HEAD" and len(saved["commit"]) == 40 and len(saved["rows"]) == len(rows)
    with pytest.raises(ValueError, match="--against=no-such-commit"):
        bench.load_code_at("no-such-commit")


def test_attention_weights_times_values_is_the_layers_own_attention():
    # bench.attention_weights recomputes softmax(q k^T / sqrt(hd)) by hand (the model's
    # scaled_dot_product_attention returns no weights). Checked against the layer itself:
    # weights @ values, through the output projection, is the attention sublayer's output,
    # in the training forward (past_kv: the clean stream) and in the cached sampler (write_kv)
    from conftest import random_layout, tiny
    model = tiny()
    _, x0, x_t, prompt_mask, P = random_layout(model)
    layer, calls = model.decoder[0], []
    hooks = [layer.register_forward_pre_hook(lambda m, args: calls.append(args)),
             layer.attn.register_forward_hook(lambda m, args, out: calls.append(out))]
    with torch.no_grad():
        model.logits(x0, x_t, prompt_mask)
        runner = model.make_runner(x0[:, :P], True, None)
        runner.logits(x_t[:, P:P + 4])
    for h in hooks:
        h.remove()
    for (args, (y, (_, v))) in [(calls[0], calls[1]), (calls[2], calls[3])]:
        w = bench.attention_weights(layer, *args)  # (b, H, n, n_keys)
        past_kv, write_kv = (args + (None, None))[4:6]
        values = torch.cat([past_kv[1], v], 2) if past_kv is not None else runner.dec.v[0][:, :, :w.shape[-1]]
        assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))
        mine = layer.attn.out((w @ values).transpose(1, 2).flatten(2))
        torch.testing.assert_close(mine, y, atol=1e-10, rtol=1e-8)
    assert calls[2][5] is not None and calls[0][4] is not None  # both paths were exercised


# --- the fine-tuning walk-through (bench.py finetune) ----------------------------------

@pytest.mark.parametrize("kind", ["e2d2", "bd3lm"])
def test_read_the_prompt_splits_all_attention_and_scores_every_block(kind):
    model = tiny(kind)
    _, x0, _, prompt_mask, P = random_layout(model, n_answer_blocks=3)
    r = bench.read_the_prompt(model, x0, prompt_mask, torch.Generator().manual_seed(0))
    n_layers = model.cfg.n_dec if kind == "e2d2" else model.cfg.n_enc
    masses = r["attention"]
    assert all(len(v) == n_layers for v in masses.values())
    assert min(masses["own_block"]) > 0  # a [MASK] query always sees its own block (the noisy queries were read)
    for layer in range(n_layers):  # a [MASK] query sees the prompt, earlier blocks and its own block: nothing else
        assert sum(masses[k][layer] for k in masses) == pytest.approx(1.0)
    assert len(r["loss_by_block"]) == 3 and all(v > 0 for v in r["loss_by_block"])
    # a model that cannot see the prompt puts no weight on it: its prompt rows all padding
    x0[:, :P] = model.cfg.pad_id
    r = bench.read_the_prompt(model, x0, prompt_mask, torch.Generator().manual_seed(0))
    assert max(r["attention"]["prompt"]) == 0.0


def test_finetune_runs_are_train_flags_that_build_their_models():
    import train  # the runs are train.py command lines: each must parse and build its model
    state = {"best_lr": {fam: lrs[0] for fam, (_, lrs) in bench.FT_SWEPT.items()},
             "recipe": "e2d2-shared_kv-tied-top", "equal_time_steps": dict.fromkeys(bench.ft_equal_time(False), 700)}
    names = []
    for stage in ("pretrain", "sweep", "variants", "long", "frontier"):
        for name, flags in bench.ft_runs(stage, "D", state, quick=False).items():
            model_over, train_over = train.parse_args(flags)
            assert train_over["data"] in ("D/topics.txt", "D/vowels_train.jsonl"), name
            assert (train_over.get("init_from") == "D/ar-pre/ckpt.pt") == (name not in ("ar-pre", "ar-scratch"))
            ModelConfig(**{**model_over, "vocab_size": 260})
            names.append(name)
    assert len(names) == len(set(names))
    assert {"e2d2-ndec2-B8-equal-time", "e2d2-ndec4-B4-equal-time", "frontier-bd3lm-B4", "frontier-ndec4-B4",
            "frontier-ndec1-B8"} <= set(names)


def test_finetune_recipe_moves_off_the_papers_decoder_only_beyond_the_noise(monkeypatch):
    # every run "finished", with a validation NELBO (and its standard error) made up here
    monkeypatch.setattr(bench.os.path, "exists", lambda path: True)
    paper = bench.FT_SWEPT["e2d2-paper"][1]
    nelbo = {f"{fam}-lr{lr:g}": 2.0 for fam, (_, lrs) in bench.FT_SWEPT.items() for lr in lrs}
    nelbo[f"e2d2-paper-lr{paper[-1]:g}"] = 1.70  # the paper's decoder at its best rate
    monkeypatch.setattr(bench, "ft_val_nelbo", lambda d, name: nelbo[name])
    monkeypatch.setattr(bench, "ft_val_nelbo_se", lambda d, name: 0.1)
    others = [n for n in bench.FT_DECODERS if n != "e2d2-shared_kv-tied-top"]
    for n in others:
        nelbo[n] = 1.69  # better, but by far less than two standard errors (2 x 0.14)
    assert bench.ft_state("D", False, None)["recipe"] == "e2d2-shared_kv-tied-top"
    nelbo[others[1]] = 1.70 - 0.3  # lower by more than 2 x hypot(0.1, 0.1) = 0.28
    assert bench.ft_state("D", False, None)["recipe"] == others[1]


@pytest.mark.slow
def test_finetune_walkthrough_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "bench.py", "finetune", "--quick", f"--out_dir={tmp_path / 'runs'}",
                        f"--json_dir={tmp_path}", "--threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "finetune.json").read_text())
    assert results["task"]["vowels"]["copy_chrf"] > 20 and results["task"]["spaces"]["copy_chrf"] == 100
    assert set(bench.ft_equal_time(True)) | {"frontier-bd3lm-B4"} <= set(results["runs"])
    speed = json.loads((tmp_path / "finetune_speed.json").read_text())
    assert set(speed["train_step_s"]) >= {"ar", "bd3lm", "bd3lm-B4", "mdlm", "e2d2-ndec1-B4", *bench.FT_DECODERS}
    assert set(speed["equal_time_steps"]) == set(bench.ft_equal_time(True))
    probe = json.loads((tmp_path / "finetune_probe.json").read_text())
    runs = {k: v for k, v in probe.items() if k not in ("commit", "dirty")}  # (write_json records the code's commit)
    assert runs and all(rows[0]["step"] == 0 for rows in runs.values())
    assert "ar-scratch" in speed["decode_tokens_per_s"]  # both AR models on the frontier
    # the equal-time comparison again at the other seeds: only the seed runs train
    r = subprocess.run([sys.executable, "bench.py", "finetune", "--quick", "--stage=seeds", f"--out_dir={tmp_path / 'runs'}",
                        f"--json_dir={tmp_path}", "--threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("training ") == len(bench.FT_SEED_BLOCKS) * 2 * (len(bench.FT_SEEDS) - 1)
    seeds = json.loads((tmp_path / "finetune_seeds.json").read_text())
    for B in bench.FT_SEED_BLOCKS:
        table = seeds["by_block_len"][str(B)]
        assert len(table["e2d2"]["val_nelbo"]) == len(bench.FT_SEEDS) and table["summary"]["bd3lm"]["val_nelbo"]["n"] == 3
    # both AR models timed beside E2D2 and BD3-LM (every run already trained: nothing trains)
    r = subprocess.run([sys.executable, "bench.py", "finetune", "--quick", "--stage=ar_speed", f"--out_dir={tmp_path / 'runs'}",
                        f"--json_dir={tmp_path}", "--threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "training " not in r.stdout, r.stderr[-2000:]
    ar_speed = json.loads((tmp_path / "finetune_ar_speed.json").read_text())
    assert {"ar-scratch", "frontier-bd3lm-B4"} <= set(ar_speed["decode_tokens_per_s"]) == set(ar_speed["test"])


def test_finetune_seed_runs_repeat_the_equal_time_comparison_with_only_the_seed_changed():
    import train
    state = {"best_lr": {fam: lrs[-1] for fam, (_, lrs) in bench.FT_SWEPT.items()},
             "recipe": "e2d2-shared_kv-tied-top", "equal_time_steps": dict.fromkeys(bench.ft_equal_time(False), 467)}
    first = {**bench.ft_runs("sweep", "D", state, False), **bench.ft_runs("long", "D", state, False),
             **bench.ft_runs("frontier", "D", state, False)}
    pairs = bench.ft_seed_pairs(state, False)
    assert pairs == {4: ("e2d2-ndec4-B4-equal-time", "frontier-bd3lm-B4"), 8: ("e2d2-ndec4-B8-equal-time", "bd3lm-lr0.003")}
    runs = bench.ft_seed_runs("D", state, False)
    assert len(runs) == 2 * 2 * len(bench.FT_SEEDS)
    for B, pair in pairs.items():
        for name in pair:
            assert runs[name] == first[name]  # the first seed's run is the walk-through's own
            for seed in bench.FT_SEEDS[1:]:
                flags = runs[f"seeds/{name}-seed{seed}"]
                assert flags == first[name] + [f"--seed={seed}"]  # the same run (steps, lr, B), another seed
                model_over, train_over = train.parse_args(flags)
                assert train_over["seed"] == seed and model_over["block_len"] == B


def test_finetune_seed_table_pairs_each_seed_and_counts_the_wins():
    state = {"best_lr": {"bd3lm": 0.003}}
    rows = {}
    for B, (e2d2, bd3lm) in bench.ft_seed_pairs(state, False).items():
        for i, seed in enumerate(bench.FT_SEEDS):
            # E2D2 ahead on chrF at T = B at two seeds of three, BD3-LM lower NELBO at every seed
            chrf = {"e2d2": [30.0, 32.0, 20.0][i], "bd3lm": [28.0, 29.0, 25.0][i]}
            for model, name in (("e2d2", e2d2), ("bd3lm", bd3lm)):
                rows[bench.seed_run(name, seed)] = {"steps": 300, "val_nelbo": 1.0 + (model == "e2d2") + i,
                                                    "val_curve": [[300, 1.0 + (model == "e2d2") + i, 0.05]],
                                                    "test": {str(B): {"chrf": chrf[model]}, str(B // 2): {"chrf": 1.0}}}
    t = bench.ft_seed_table(rows, state, False)["by_block_len"]["4"]
    assert t["e2d2"]["chrf_T4"] == [30.0, 32.0, 20.0]
    assert t["summary"]["e2d2"]["chrf_T4"]["mean"] == pytest.approx(82 / 3)
    assert t["e2d2_minus_bd3lm"]["chrf_T4"]["mean"] == pytest.approx((2 + 3 - 5) / 3)
    assert t["e2d2_minus_bd3lm"]["chrf_T4"]["sd"] == pytest.approx(4.3589, abs=1e-4)  # of (2, 3, -5)
    assert t["e2d2_ahead_on_seeds"] == {"val_nelbo": 0, "chrf_T4": 2, "chrf_T2": 0}
