"""The baselines AR, MDLM and BD3-LM: the BD3-LM mask by hand, cache equivalences, and
each one's loss falling in a tiny run."""
import pytest
import torch

import data
import train
from baselines import CachedBD3LM, causal_mask, full_mask
from conftest import LayerCounter, random_layout, rows, tiny
from e2d2 import bd3lm_mask, generate
from models import MODEL_TYPES


def test_bd3lm_mask_hand_worked():
    valid = torch.ones(1, 4, dtype=torch.bool)
    no_prompt = torch.zeros(1, 4, dtype=torch.bool)
    #        keys: x_0 (clean) | x_t (noisy)
    expected = rows(
        "11 00  00 00",  # clean queries: block-causal over clean keys, never noisy keys
        "11 00  00 00",
        "11 11  00 00",
        "11 11  00 00",
        "00 00  11 00",  # noisy block 0: its own noisy block only
        "00 00  11 00",
        "11 00  00 11",  # noisy block 1: clean block 0 (offset block-causal) + itself
        "11 00  00 11",
    )
    assert torch.equal(bd3lm_mask(no_prompt, valid, 2)[0], expected)
    # a 3-token prompt is read bidirectionally by the clean queries
    prompt = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    expected[0:2, 2] = True
    assert torch.equal(bd3lm_mask(prompt, valid, 2)[0], expected)


def test_causal_and_full_masks():
    valid = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(valid)[0], rows("1000", "0100", "0110", "0111"))
    assert torch.equal(full_mask(valid)[0], rows("1000", "0111", "0111", "0111"))


@pytest.mark.parametrize("prompt_attention", ["bidirectional", "block_causal"])
def test_bd3lm_train_and_inference_logits_agree(prompt_attention):
    # seq2seq: the prompt is read bidirectionally; text: block-causally (a 3-block prompt)
    model = tiny("bd3lm", prompt_attention=prompt_attention)
    B = model.cfg.block_len
    _, x0, x_t, prompt_mask, P = random_layout(model, prompt_lens=(12, 9, 6))
    if prompt_attention == "block_causal":
        prompt_mask = torch.zeros_like(prompt_mask)  # text training has no prompt
    with torch.no_grad():
        train_logits = model.logits(x0, x_t, prompt_mask)
        cached = CachedBD3LM(model, x0[:, :P])
        for start in range(P, x0.shape[1], B):
            blk = slice(start, start + B)
            assert torch.allclose(cached.logits(x_t[:, blk]), train_logits[:, blk], atol=1e-10)
            cached.finish_block(x0[:, blk])


@pytest.mark.parametrize("name", ["bd3lm", "ar"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_sampling_equals_uncached(name, temperature):
    model = tiny(name)
    prompts = [[1, 2, 3, 4, 5], [9] * 9, [4, 4]]
    kw = dict(max_new_tokens=12, temperature=temperature, stop_at_eos=False)
    a = generate(model, prompts, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    b = generate(model, prompts, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a.tokens == b.tokens and a.network_calls == b.network_calls
    assert all(len(t) == 12 for t in a.tokens)


def test_ar_batched_equals_one_by_one():
    model = tiny("ar")
    prompts = [[1, 2, 3], [5] * 6, [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    batched = generate(model, prompts, max_new_tokens=10)
    for i, p in enumerate(prompts):
        assert generate(model, [p], max_new_tokens=10).tokens[0] == batched.tokens[i]


def test_mdlm_samples_the_whole_answer_as_one_block():
    model = tiny("mdlm", seq_len=24)
    seen = []
    r = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=16, steps=4,
                 on_step=lambda k, i, rows, x: seen.append((k, x.shape[1])), stop_at_eos=False)
    assert seen == [(1, 16)] * 4  # one block of 16 (block 1: the one after the prompt), 4 steps
    assert r.network_calls == 4 and all(len(t) == 16 for t in r.tokens)
    # no cache is possible: with use_cache too, every step runs all N layers over the
    # whole [prompt ; canvas] (8 + 16 positions), one call per step
    for use_cache in (True, False):
        counter = LayerCounter(model)
        generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=16, steps=4,
                 use_cache=use_cache, stop_at_eos=False)
        counter.remove()
        assert (counter.calls, counter.tokens) == (4 * 3, 4 * 3 * 24)


def test_mdlm_batched_equals_one_by_one_each_with_its_training_canvas():
    # training lays each row out alone: prompt padded to ITS block boundary, the canvas to
    # seq_len; a batch must give every prompt that canvas, whatever the others' lengths
    model = tiny("mdlm", seq_len=24)
    prompts = [[1, 2, 3], [5] * 6, [7, 8, 9, 10, 11, 12, 13, 14, 15], []]
    canvas = [24 - data.ceil_to(len(p), 4) for p in prompts]  # 20, 16, 12, 24
    kw = dict(steps=6, stop_at_eos=False)
    batched = generate(model, prompts, **kw)
    assert [len(t) for t in batched.tokens] == canvas
    for i, p in enumerate(prompts):
        assert generate(model, [p], **kw).tokens[0] == batched.tokens[i], f"prompt {i}"


def test_ar_needs_a_prompt_and_mdlm_does_not():
    with pytest.raises(ValueError, match="non-empty prompt"):
        generate(tiny("ar"), [[]], max_new_tokens=4)
    # MDLM generates unconditionally: an empty prompt gets the whole seq_len canvas
    r = generate(tiny("mdlm", seq_len=16), [[]], steps=4, stop_at_eos=False)
    assert len(r.tokens[0]) == 16 and r.network_calls == 4


@pytest.mark.parametrize("name", [n for n in MODEL_TYPES if n != "e2d2"])  # every baseline in the registry
def test_baseline_loss_falls_in_a_tiny_run(name, tmp_path):
    tc = train.TrainConfig(task="addition", digits=2, out_dir=str(tmp_path), batch_size=32,
                           max_steps=150, lr=3e-3, warmup_steps=20, eval_every=150,
                           eval_examples=16, eval_batches=1)
    cfg, _, _ = train.setup(tc, dict(model=name, d_model=48, n_heads=4, n_enc=2, block_len=2), "cpu")
    losses = train.train(cfg, tc, "cpu")["losses"]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.6 * first, (first, last)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["model"] == name and "model_type" not in ckpt  # the kind, stored once
