"""The benchmarks' analytic costs are exact counts of what the code runs, and both
benchmarks run end to end at tiny sizes (their speed is measured by running them, not
asserted here)."""
import json
import subprocess

import pytest
import torch

import bench
import models
from conftest import LayerCounter, random_layout, tiny
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
    assert forward == models.model_spec(model.cfg.model).forward_flops(model, 16) * tokens > 0  # tolerance: none
    # the backward multiplies twice what the forward did, in every layer that reaches the loss
    # (train_flops_per_token: 3 x forward). shared_kv's top encoder layer reaches it through its
    # keys/values only: its attention, output projection and MLP run forward, nothing reads them,
    # and autograd skips their backward (the fused q/k/v product is used, so it is not skipped)
    top = model.encoder[-1] if decoder == "shared_kv" else None
    skipped = 0 if top is None else 2 * (models.layer_flops(top, 16) - 2 * top.attn.qkv.weight.numel()) * tokens
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
    # models.attention_weights recomputes softmax(q k^T / sqrt(hd)) by hand (the model's
    # scaled_dot_product_attention returns no weights). Checked against the layer itself:
    # weights @ values, through the output projection, is the attention sublayer's output,
    # in the training forward (with_past: the clean stream) and in the cached sampler (the cache)
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
    for (args, (y, (k, v))) in [(calls[0], calls[1]), (calls[2], calls[3])]:
        w = models.attention_weights(layer, *args)  # (b, H, n, n_keys)
        _, values = args[4](k, v)  # [earlier values ; the layer's own]
        assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))
        mine = layer.attn.out((w @ values).transpose(1, 2).flatten(2))
        torch.testing.assert_close(mine, y, atol=1e-10, rtol=1e-8)
    assert calls[0][4] is not None and calls[2][4] is not None  # both paths were exercised
