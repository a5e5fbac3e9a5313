"""The E2D2 model and sampler: train/inference consistency, cache equivalence, batching,
per-sequence [EOS] stop, clear errors. Float64 so that equal math gives equal tokens."""
import pytest
import torch

import data
from conftest import random_layout, tiny
from e2d2 import STRATEGIES, E2D2, CachedE2D2, ModelConfig, Runner, generate
from models import build_model, upgrade_optimizer_state, upgrade_state_dict

# every way a decoder can be built: (decoder, decoder_layers, tie_decoder)
VARIANTS = [dict(decoder="hidden"), dict(decoder="shared_kv"), dict(decoder="shared_kv", decoder_layers="bottom"),
            dict(decoder="hidden", tie_decoder=True), dict(decoder="shared_kv", tie_decoder=True),
            dict(decoder="shared_kv", decoder_layers="bottom", tie_decoder=True)]
variant_id = lambda v: "-".join(map(str, v.values()))  # noqa: E731


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_train_and_inference_logits_agree_block_by_block(variant):
    model = tiny(**variant)
    B = model.cfg.block_len
    prompts, x0, x_t, prompt_mask, P = random_layout(model)
    with torch.no_grad():
        train_logits = model.logits(x0, x_t, prompt_mask)  # all blocks in one pass
        cached = CachedE2D2(model, x0[:, :P])
        recompute = model.make_runner(x0[:, :P], use_cache=False, max_new_tokens=x0.shape[1] - P)
        for start in range(P, x0.shape[1], B):
            blk = slice(start, start + B)
            inf_logits = cached.logits(x_t[:, blk])
            assert torch.allclose(inf_logits, train_logits[:, blk], atol=1e-10, rtol=1e-9)
            assert torch.allclose(recompute.logits(x_t[:, blk]), train_logits[:, blk], atol=1e-10)
            cached.finish_block(x0[:, blk])
            recompute.finish_block(x0[:, blk])
    assert cached.encoder_calls == 1 + (x0.shape[1] - P) // B  # prompt + each block
    assert cached.decoder_calls == (x0.shape[1] - P) // B


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_text_model_reads_a_prompt_block_causally_as_trained(variant):
    # plain-text training has no prompt: the clean stream is block-causal everywhere. A
    # prompt of several blocks must reach the sampler's logits exactly as it reached the
    # training forward's (prompt_mask all False), in both runners
    model = tiny(**variant, prompt_attention="block_causal")
    B = model.cfg.block_len
    _, x0, x_t, _, P = random_layout(model, prompt_lens=(12, 9, 6))  # 3 prompt blocks
    text_layout = torch.zeros_like(x0, dtype=torch.bool)  # training on text: no prompt
    with torch.no_grad():
        train_logits = model.logits(x0, x_t, text_layout)
        cached = CachedE2D2(model, x0[:, :P])
        recompute = model.make_runner(x0[:, :P], use_cache=False, max_new_tokens=x0.shape[1] - P)
        for start in range(P, x0.shape[1], B):
            blk = slice(start, start + B)
            assert torch.allclose(cached.logits(x_t[:, blk]), train_logits[:, blk], atol=1e-10)
            assert torch.allclose(recompute.logits(x_t[:, blk]), train_logits[:, blk], atol=1e-10)
            cached.finish_block(x0[:, blk])
            recompute.finish_block(x0[:, blk])
        # (the seq2seq reading of the same prompt gives other logits: the check has teeth)
        prompt_mask = torch.zeros_like(x0, dtype=torch.bool)
        prompt_mask[:, :P] = True
        bidir = model.logits(x0, x_t, prompt_mask)
    assert not torch.allclose(bidir[:, P:P + B], train_logits[:, P:P + B], atol=1e-6)


def test_logits_of_block_k_ignore_every_later_block():
    model = tiny()
    B = model.cfg.block_len
    _, x0, x_t, prompt_mask, P = random_layout(model)
    with torch.no_grad():
        ref = model.logits(x0, x_t, prompt_mask)
        x0b, x_tb = x0.clone(), x_t.clone()
        x0b[:, P + B:] = 7  # change every later clean block ...
        x_tb[:, P + B:] = 8  # ... and every later noisy block
        out = model.logits(x0b, x_tb, prompt_mask)
    assert torch.allclose(out[:, P:P + B], ref[:, P:P + B], atol=1e-12)
    assert not torch.allclose(out[:, P + B:], ref[:, P + B:])


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("strategy,temperature,threshold", [
    ("ancestral", 1.0, None), ("remask", 1.0, None), ("remask", 0.0, 0.05), ("ancestral", 0.0, None)])
def test_cached_sampling_equals_uncached(strategy, temperature, threshold, variant):
    model = tiny(**variant)
    prompts = [[1, 2, 3, 4, 5], [9] * 9, [4, 4]]
    kw = dict(max_new_tokens=12, strategy=strategy, temperature=temperature,
              confidence_threshold=threshold)
    a = generate(model, prompts, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    b = generate(model, prompts, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a.tokens == b.tokens
    assert a.network_calls == b.network_calls
    assert a.decoder_calls == b.decoder_calls == a.network_calls
    assert b.encoder_calls == b.network_calls  # no cache: the encoder runs at every step
    assert a.encoder_calls < b.encoder_calls  # cache: once for the prompt + once per block
    assert all(len(t) == 12 for t, f in zip(a.tokens, a.finished) if not f)


def test_batched_sampling_equals_one_by_one():
    model = tiny()
    prompts = [[1, 2, 3], [5] * 6, [7, 8, 9, 10, 11, 12, 13, 14, 15], []]
    batched = generate(model, prompts, max_new_tokens=12)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=12)
        assert alone.tokens[0] == batched.tokens[i], f"prompt {i}"


def test_skip_network_call_when_block_did_not_change():
    model = tiny()
    prompts = [[1, 2, 3, 4], [5, 6]]
    after = {}  # block -> its state after each step
    # 32 ancestral steps for 4 tokens: most steps reveal nothing, so most calls are skipped
    r = generate(model, prompts, max_new_tokens=8, steps=32, strategy="ancestral", temperature=1.0,
                 generator=torch.Generator().manual_seed(0),
                 on_step=lambda k, i, rows, x: after.setdefault(k, []).append(x.clone()))
    # step i starts from the all-[MASK] block (i = 0) or from what step i - 1 left; the
    # network runs at step 0 and at every step whose start differs from the step before
    expected = 0
    for xs in after.values():
        starts = [torch.full_like(xs[0], model.cfg.mask_id)] + xs[:-1]
        expected += 1 + sum(not torch.equal(a, b) for a, b in zip(starts[:-1], starts[1:]))
    assert r.network_calls == expected
    # at most one call per reveal (2 blocks x 2 rows x 4 tokens), far fewer than steps run
    assert r.network_calls <= 2 * 2 * 4 < sum(len(xs) for xs in after.values())


def test_remask_reveals_on_schedule():
    model = tiny()
    seen = []
    generate(model, [[1, 2, 3]], max_new_tokens=4, steps=4,
             on_step=lambda k, i, rows, x: seen.append(int((x == model.cfg.mask_id).sum())))
    assert seen == [3, 2, 1, 0]  # linear schedule, T = B: one token per step
    seen.clear()
    generate(model, [[1, 2, 3]], max_new_tokens=4, steps=2,
             on_step=lambda k, i, rows, x: seen.append(int((x == model.cfg.mask_id).sum())))
    assert seen == [2, 0]


class ScriptedRunner(Runner):
    """Stands in for CachedE2D2: a sequence whose prompt ends in token s emits [EOS] in
    answer block s (its logits are made by hand), so the test knows where each stops."""

    calls = []

    def __init__(self, model, prompt, max_new_tokens):
        super().__init__(model, prompt, max_new_tokens)  # the caller's steps; whole blocks
        self.cfg, self.last, self.block = model.cfg, prompt[:, -1].clone(), 0

    def logits(self, x):
        ScriptedRunner.calls.append((self.block, self.last.tolist()))
        out = torch.zeros(*x.shape, self.cfg.vocab_size, dtype=torch.float64)
        out[..., 65] = 1.0  # 'A' everywhere ...
        stop = (self.last == self.block)
        out[stop, :, self.cfg.eos_id] = 2.0  # ... or [EOS] in the block where this row stops
        self.decoder_calls += 1
        return out

    def finish_block(self, block):
        self.block += 1

    def select(self, rows):
        super().select(rows)
        self.last = self.last[rows]


def test_per_sequence_eos_stop(monkeypatch):
    model = tiny()
    monkeypatch.setattr(E2D2, "make_runner", lambda self, prompt, use_cache, max_new_tokens: ScriptedRunner(self, prompt, max_new_tokens))
    ScriptedRunner.calls = []
    r = generate(model, [[50, 1], [50, 0], [50, 9]], max_new_tokens=12)
    assert r.finished == [True, True, False]
    assert r.tokens == [[65] * 4, [], [65] * 12]
    # rows leave the batch once done: block 0 has all three, block 1 two, block 2 one
    assert [c[1] for c in ScriptedRunner.calls if c[0] == 0][0] == [1, 0, 9]
    assert [c[1] for c in ScriptedRunner.calls if c[0] == 1][0] == [1, 9]
    assert [c[1] for c in ScriptedRunner.calls if c[0] == 2][0] == [9]


def test_bad_config_gives_clear_errors():
    with pytest.raises(ValueError, match="not a multiple of block_len"):
        ModelConfig(seq_len=30, block_len=4)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="decoder='shared_kv', tie_decoder=False pairs each decoder layer .* needs n_dec <= n_enc"):
        ModelConfig(decoder="shared_kv", n_enc=2, n_dec=3)
    with pytest.raises(ValueError, match="decoder='hidden', tie_decoder=True pairs each decoder layer .* needs n_dec <= n_enc"):
        ModelConfig(tie_decoder=True, n_enc=2, n_dec=3)
    with pytest.raises(ValueError, match="decoder_layers must be one of"):
        ModelConfig(decoder_layers="middle")
    with pytest.raises(ValueError, match="tie_decoder must be one of"):
        ModelConfig(tie_decoder="yes")
    with pytest.raises(ValueError, match="schedule must be one of"):
        ModelConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="decoder must be one of"):
        ModelConfig(decoder="cross")
    with pytest.raises(ValueError, match="t_min < t_max"):
        ModelConfig(t_min=0.5, t_max=0.2)


def test_too_long_input_gives_clear_errors():
    model = tiny(seq_len=16)
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, [list(range(14))])
    with pytest.raises(ValueError, match="max_new_tokens=12 must be between 1 and 8"):
        generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=12)
    with pytest.raises(ValueError, match="at most seq_len=16"):
        model(torch.zeros(1, 20, dtype=torch.long), torch.zeros(1, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"example 1 .* more than the model's seq_len=16"):
        data.collate([([1, 2], [3]), ([1] * 10, [2] * 5)], 4, 16)


def test_loss_backward_and_every_block_is_trained():
    model = tiny().train()
    _, x0, _, prompt_mask, P = random_layout(model)
    out = model(x0, prompt_mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.n_targets.item() == (x0.shape[1] - P) * 3
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_shared_kv_decoder_reads_the_top_encoder_layers():
    # decoder layer i reads the keys/values of encoder layer N_enc - N_dec + i, so every
    # encoder layer shapes the loss; unused are only what comes after the last keys/values:
    # the top layer's queries, output projection and MLP, and enc_norm (h is never read)
    model = tiny(decoder="shared_kv").train()  # N_enc = 3, N_dec = 2: encoder layers 1 and 2
    _, x0, _, prompt_mask, _ = random_layout(model)
    model(x0, prompt_mask, generator=torch.Generator().manual_seed(0)).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()}
    top = "encoder.2."
    assert no_grad == {"enc_norm.weight", top + "attn.out.weight",
                       top + "norm2.weight", top + "mlp.gate.weight", top + "mlp.up.weight",
                       top + "mlp.down.weight"}
    # the fused projection of the top layer: its query rows get no gradient, its K/V rows do
    d = model.cfg.d_model
    qkv_grad = model.encoder[2].attn.qkv.weight.grad  # rows: W_q, W_k, W_v
    assert not qkv_grad[:d].abs().sum() and qkv_grad[d:2 * d].abs().sum() and qkv_grad[2 * d:].abs().sum()


def test_shared_kv_bottom_decoder_reads_the_bottom_encoder_layers():
    # decoder layer i reads encoder layer i: what comes after encoder layer 1's keys/values
    # (its queries, output, MLP; all of layer 2; enc_norm) never reaches the loss
    model = tiny(decoder="shared_kv", decoder_layers="bottom").train()  # N_enc = 3, N_dec = 2: layers 0, 1
    _, x0, _, prompt_mask, _ = random_layout(model)
    model(x0, prompt_mask, generator=torch.Generator().manual_seed(0)).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()}
    after = {"attn.out.weight", "norm2.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight"}
    layer2 = {n for n, _ in model.named_parameters() if n.startswith("encoder.2.")}
    assert no_grad == {"enc_norm.weight"} | {"encoder.1." + n for n in after} | layer2
    assert not model.encoder[1].attn.qkv.weight.grad[:model.cfg.d_model].abs().sum()  # its queries


def test_tied_decoder_layer_is_its_encoder_layer():
    # tie_decoder: decoder layer j IS encoder layer N_enc - N_dec + j, one set of weights:
    # no new parameters, and its gradient is the sum of what both uses ask of it
    tied = tiny(decoder="shared_kv", tie_decoder=True).train()  # N_enc = 3, N_dec = 2: layers 1, 2
    layer_params = sum(p.numel() for p in tied.encoder[0].parameters())
    assert tied.num_params() == tiny(model="bd3lm").num_params() + tied.cfg.d_model  # the same stack + enc_norm
    assert tied.num_params() == tiny(decoder="shared_kv").num_params() - 2 * layer_params
    assert not [n for n, _ in tied.named_parameters() if n.startswith("decoder.")]  # one name per tensor
    for j, i in enumerate((1, 2)):
        for p, q in zip(tied.decoder[j].parameters(), tied.encoder[i].parameters()):
            assert p is q
    # the same weights, untied: two copies of layers 1 and 2
    untied = build_model(ModelConfig(**{**vars(tied.cfg), "tie_decoder": False})).double().train()
    untied.load_state_dict(tied.state_dict())  # decoder.j = encoder.i's values, now copies
    _, x0, _, prompt_mask, _ = random_layout(tied)
    for m in (tied, untied):
        m(x0, prompt_mask, generator=torch.Generator().manual_seed(0)).loss.backward()
    for j, i in enumerate((1, 2)):
        for (name, p), q_enc, q_dec in zip(tied.encoder[i].named_parameters(), untied.encoder[i].parameters(),
                                           untied.decoder[j].parameters()):
            assert q_dec.grad.abs().sum() > 0, name  # the decoder's use adds to every tensor's gradient
            enc_grad = torch.zeros_like(p) if q_enc.grad is None else q_enc.grad  # (the top layer's MLP: none)
            torch.testing.assert_close(p.grad, enc_grad + q_dec.grad, rtol=1e-10, atol=1e-14)
    # a step moves both at once: they stay one tensor
    before = tied.encoder[2].mlp.up.weight.detach().clone()
    torch.optim.AdamW(tied.parameters(), lr=1e-2).step()
    assert not torch.equal(tied.encoder[2].mlp.up.weight, before)
    assert torch.equal(tied.decoder[1].mlp.up.weight, tied.encoder[2].mlp.up.weight)


def test_hidden_decoder_projects_h_with_each_layers_own_norm_and_kv_weights():
    # the "hidden" variant: decoder layer l's clean keys/values are h through THAT layer's
    # input norm and the K/V rows of its projection, keys rotated by RoPE at h's positions.
    # Computed here by hand (RMSNorm, matrix products, RoPE as a complex rotation of each
    # pair of dimensions), independently of Attention's own code
    model = tiny()  # d = 32, H = 4, hd = 8
    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    d, H, n = cfg.d_model, cfg.n_heads, 6
    hd = d // H
    h = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    pos = torch.arange(3, 3 + n, dtype=torch.float64)  # positions 3..8: RoPE's offset matters
    angle = pos[:, None] * cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (n, hd/2)
    with torch.no_grad():
        for layer in model.decoder:  # norm weights unlike each other (all ones at init)
            for norm in (layer.norm1, layer.norm2):
                norm.weight.copy_(1 + 0.5 * torch.randn(d, generator=g, dtype=torch.float64))
        clean = model.clean_kv(h, slice(3, 3 + n), enc_kv=None)
        for layer, (k, v) in zip(model.decoder, clean):
            hn = h / (h.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * layer.norm1.weight
            W = layer.attn.qkv.weight  # rows: W_q, W_k, W_v
            k_hand = (hn @ W[d:2 * d].T).view(2, n, H, hd // 2, 2)
            k_hand = torch.view_as_real(torch.view_as_complex(k_hand.contiguous())
                                        * torch.polar(torch.ones_like(angle), angle)[None, :, None])
            v_hand = (hn @ W[2 * d:].T).view(2, n, H, hd)
            torch.testing.assert_close(k, k_hand.reshape(2, n, H, hd).transpose(1, 2))
            torch.testing.assert_close(v, v_hand.transpose(1, 2))


@pytest.mark.parametrize("schedule,steps", [("linear", 4), ("cosine", 3), ("power", 7), ("log", 9)])
def test_a_threshold_no_probability_reaches_changes_nothing(schedule, steps):
    # the confidence threshold only ever adds reveals: at 2.0 (above any probability) the
    # tokens and calls are those of the plain remask schedule, whatever the schedule and T
    model = tiny(schedule=schedule)
    prompts = [[1, 2, 3, 4, 5], [9] * 9, [4, 4]]
    kw = dict(max_new_tokens=12, steps=steps)
    plain = generate(model, prompts, **kw)
    thresholded = generate(model, prompts, confidence_threshold=2.0, **kw)
    assert plain.tokens == thresholded.tokens
    assert plain.network_calls == thresholded.network_calls


def test_checkpoint_with_separate_q_and_kv_weights_loads():
    # a state dict written before the projections were fused holds attn.q and attn.kv;
    # it loads into attn.qkv (rows W_q, W_k, W_v) and gives the same logits
    model = tiny().eval()
    old = {}
    for name, w in model.state_dict().items():
        if name.endswith("attn.qkv.weight"):
            d = w.shape[1]
            old[name.replace("qkv.weight", "q.weight")] = w[:d].clone()
            old[name.replace("qkv.weight", "kv.weight")] = w[d:].clone()
        else:
            old[name] = w
    fresh = E2D2(model.cfg).double().eval()
    fresh.load_state_dict(upgrade_state_dict(old))
    _, x0, x_t, prompt_mask, _ = random_layout(model)
    with torch.no_grad():
        assert torch.equal(fresh.logits(x0, x_t, prompt_mask), model.logits(x0, x_t, prompt_mask))


def test_optimizer_state_with_separate_q_and_kv_resumes_exactly():
    # AdamW's state saved before the projections were fused is keyed by the old parameter
    # order (attn.q and attn.kv apart); upgraded, it is the state of the fused matrix, so
    # the next step gives exactly the weights of a run that never stopped
    model = tiny()
    _, x0, _, prompt_mask, _ = random_layout(model)
    names = [name for name, _ in model.named_parameters()]

    def step(m, opt, seed):
        m.train()
        m(x0, prompt_mask, generator=torch.Generator().manual_seed(seed)).loss.backward()
        opt.step()
        opt.zero_grad()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt, 0)
    step(model, opt, 1)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    # the state as the old code wrote it: q then kv where qkv is, in module order
    d, old_names, old_state = model.cfg.d_model, [], {}
    for i, name in enumerate(names):
        parts = [(name, slice(None))]
        if name.endswith("attn.qkv.weight"):
            stem = name[:-len("qkv.weight")]
            parts = [(stem + "q.weight", slice(0, d)), (stem + "kv.weight", slice(d, None))]
        for part, rows in parts:
            old_state[len(old_names)] = {k: v[rows].clone() if v.dim() else v.clone()
                                         for k, v in saved["state"][i].items()}
            old_names.append(part)
    old = {"state": old_state, "param_groups": [{**saved["param_groups"][0], "params": list(range(len(old_names)))}]}

    resumed = tiny()
    resumed.load_state_dict(saved_weights)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(upgrade_optimizer_state(old, old_names, names))
    step(model, opt, 2)
    step(resumed, opt2, 2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_compiled_sampler_gives_the_eager_tokens():
    # sample.py --compile: the layer stacks compiled (fused small operations)
    # sample the same tokens as eager, with the same calls, through the growing cache (a new
    # length at every block) and at a second batch size (a recompilation)
    import torch._dynamo
    from models import build_model, compile_for_sampling

    torch.manual_seed(0)
    cfg = ModelConfig(seq_len=32, block_len=4, d_model=64, n_heads=2, n_enc=2, n_dec=1)
    eager = build_model(cfg).eval()
    compiled = build_model(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    compile_for_sampling(compiled)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9], [4]]
    for batch in (prompts, prompts[:2]):
        want = generate(eager, batch, max_new_tokens=16, steps=4)
        got = generate(compiled, batch, max_new_tokens=16, steps=4)
        assert got.tokens == want.tokens and got.network_calls == want.network_calls
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # it did compile


@pytest.mark.parametrize("strategy", STRATEGIES)  # every strategy there is
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_strategy_samples_the_same_tokens_with_and_without_the_cache(strategy, temperature):
    # a strategy added to e2d2.STRATEGIES is run here at once: the cached sampler gives the
    # uncached reference's tokens (the same draws in the same order), every [MASK] is filled
    model = tiny()
    prompts = [[1, 2, 3, 4, 5], [9] * 9]
    kw = dict(max_new_tokens=12, steps=3, strategy=strategy, temperature=temperature, stop_at_eos=False)
    cached = generate(model, prompts, generator=torch.Generator().manual_seed(1), **kw)
    uncached = generate(model, prompts, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert cached.tokens == uncached.tokens and all(len(t) == 12 for t in cached.tokens)
    assert all(model.cfg.mask_id not in t for t in cached.tokens)  # every [MASK] filled by the last step
    with pytest.raises(ValueError, match="strategy must be one of"):
        generate(model, prompts, strategy=strategy + "x")
