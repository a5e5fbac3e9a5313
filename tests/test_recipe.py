"""The paper's recipe on real text: a byte-level BPE tokenizer stored in the checkpoint,
E2D2 (and BD3-LM, MDLM) initialised from an AR model, and nucleus (top-p) sampling."""
import os
import random
import re
from dataclasses import fields

import pytest
import torch

import data
import models
import train
from baselines import causal_mask
from conftest import ENV, random_layout, run, script_error, tiny
from e2d2 import ModelConfig, concat_after, denoise_step, encoder_mask, generate, nucleus
from models import build_model, init_from_checkpoint, load_checkpoint, model_from_checkpoint

TEXT = ("The for statement is used to iterate over the elements of a sequence. "
        "A function definition defines a user-defined function object. "
        "Exceptions are raised by the raise statement; naïve café, 20 € and 3.14.\n") * 40


# --- the tokenizers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe():
    pytest.importorskip("tokenizers")
    return data.BPETokenizer.train([TEXT.encode("utf-8")], vocab_size=340)


def random_byte_strings(n=300, seed=0):
    """Random byte strings of every kind: empty, all 256 values, invalid UTF-8 (lone
    continuation bytes, truncated sequences), text with multi-byte characters."""
    rng = random.Random(seed)
    out = [b"", bytes(range(256)), b"\xff\xfe\x80", "café €".encode()[:-1], b"\xc3", TEXT.encode()[:500]]
    for _ in range(n):
        out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))))
        words = rng.choices(["the", " for", "  ", "\n", "é", "€", "x1", "PAD", "<MASK>", "\t"], k=rng.randrange(1, 20))
        out.append("".join(words).encode())
    return out


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_every_byte_string_encodes_and_decodes_back(kind, request):
    tok = data.ByteTokenizer() if kind == "bytes" else request.getfixturevalue("bpe")
    per = tok.bytes_per_token()
    for raw in random_byte_strings():
        ids = tok.encode_bytes(raw)
        assert tok.to_bytes(ids) == raw
        assert all(0 <= i < tok.vocab_size and i not in (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id)
                   for i in ids)  # no text ever becomes a special token (not even "PAD")
        assert int(per[ids].sum()) == len(raw)  # the per-byte NELBO divides by exactly these bytes
    s = "naïve café, 20 € and 3.14"
    assert tok.decode(tok.encode(s)) == s  # valid UTF-8 text comes back as the same str


def test_bpe_learns_merges_and_reserves_the_special_ids(bpe):
    assert bpe.vocab_size == 340  # the 4 special tokens included
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.mask_id) == (336, 337, 338, 339)
    ids = bpe.encode(" statement")
    assert len(ids) == 1 and bpe.to_bytes(ids) == b" statement"  # a frequent word is one token
    assert len(bpe.encode_bytes(TEXT.encode())) < len(TEXT.encode()) / 3
    assert bpe.decode([*bpe.encode("ab"), bpe.mask_id, bpe.eos_id], mask_char="_", eos_char="$") == "ab_$"
    # what a checkpoint stores rebuilds the same tokenizer
    again = data.tokenizer_from_dict(bpe.to_dict())
    assert again.encode_bytes(TEXT.encode()) == bpe.encode_bytes(TEXT.encode())
    assert isinstance(data.tokenizer_from_dict(None), data.ByteTokenizer)  # old checkpoints: bytes
    with pytest.raises(ValueError, match="at least 260"):
        data.BPETokenizer.train([b"abc"], vocab_size=100)


def test_missing_tokenizers_package_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tokenizers(name, *a, **kw):
        if name == "tokenizers":
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ValueError, match="pip install tokenizers"):
        data.BPETokenizer.train([b"abc"], vocab_size=300)
    assert data.ByteTokenizer().encode("ok") == [111, 107]  # bytes need nothing


def test_pydoc_topics_text_and_its_heldout_part(tmp_path):
    full, held = tmp_path / "topics.txt", tmp_path / "heldout.txt"
    n = data.write_pydoc_topics(str(full), str(held))
    raw = full.read_bytes()
    assert n == len(raw) > 100_000 and b"The \"for\" statement" in raw
    assert held.read_bytes() == raw[len(raw) - int(len(raw) * 0.1):]  # what TextData holds out
    ds = data.TextData(str(full), seq_len=64)
    assert bytes(ds.val) == held.read_bytes()


# --- the tokenizer inside the checkpoint ---------------------------------------------

def test_bpe_checkpoint_needs_no_side_file(tmp_path, bpe):
    text = tmp_path / "book.txt"
    text.write_bytes(TEXT.encode() * 3)
    out = tmp_path / "run"
    r = run("train.py", f"--data={text}", "--tokenizer=bpe", "--bpe_vocab=300", "--d_model=32", "--n_enc=2",
            "--n_dec=1", "--seq_len=32", "--batch_size=8", "--max_steps=2", "--eval_every=2", "--eval_batches=1",
            "--eval_draws=1", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "byte-level BPE, 300 tokens" in r.stdout
    ckpt = load_checkpoint(str(out / "ckpt.pt"), "cpu")
    tok = data.tokenizer_from_dict(ckpt["tokenizer"])
    assert ckpt["tokenizer"]["kind"] == "bpe" and tok.vocab_size == ckpt["config"]["vocab_size"] == 300
    assert ckpt["config"]["mask_id"] == tok.mask_id and ckpt["config"]["pad_id"] == tok.pad_id
    # the held-out NELBO per byte divides by the bytes of the BPE tokens scored
    log = [line for line in open(out / "log.jsonl") if "val_nelbo_per_byte" in line]
    assert log
    # the data file and everything else is gone: sample.py reads the tokenizer from the checkpoint
    text.unlink()
    r = run("sample.py", f"--ckpt={out / 'ckpt.pt'}", "--max_new_tokens=8", "The for")
    assert r.returncode == 0, r.stderr
    model = model_from_checkpoint(ckpt, "cpu")
    res = generate(model, [tok.encode("The for")], max_new_tokens=8)
    assert r.stdout.splitlines()[0] == "The for" + tok.decode(res.tokens[0])
    # --eval on text: windows of seq_len BPE tokens, the bytes they stand for
    held = tmp_path / "held.txt"
    held.write_bytes(TEXT.encode())
    r = run("sample.py", f"--ckpt={out / 'ckpt.pt'}", f"--eval={held}", "--eval_draws=1")
    assert r.returncode == 0, r.stderr
    windows = data.text_windows(tok.encode_bytes(TEXT.encode()), 32)
    scored = sum(len(tok.to_bytes(w)) for w in windows)
    assert f"{scored} bytes scored in {len(windows)} windows of 32 tokens" in r.stdout


def test_builtin_tasks_stay_bytes(capsys):
    err = script_error(train.main, ["--tokenizer=bpe", "--max_steps=1"], capsys)
    assert "--tokenizer=bpe needs a data file" in err


# --- starting from an AR model --------------------------------------------------------

def ar_checkpoint(**kw):
    ar = tiny("ar", n_enc=3, **kw)
    with torch.no_grad():  # norm gains away from their initial 1, so a norm copied wrongly shows
        for p in ar.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return ar, {"config": {**vars(ar.cfg)}, "model": ar.state_dict(), "tokenizer": {"kind": "bytes"}}


# (decoder, decoder_layers, tie_decoder): every way an E2D2 can take its decoder from the AR
DECODER_INITS = [("hidden", "top", False), ("shared_kv", "top", False), ("hidden", "bottom", False),
                 ("shared_kv", "top", True), ("shared_kv", "bottom", True), ("hidden", "top", True)]


@pytest.mark.parametrize("decoder,decoder_layers,tie", DECODER_INITS)
def test_e2d2_from_ar_with_block_len_1_reproduces_the_ar_hidden_states(decoder, decoder_layers, tie):
    ar, ckpt = ar_checkpoint()
    cfg = ModelConfig(**{**vars(ar.cfg), "model": "e2d2", "block_len": 1, "n_dec": 2, "decoder": decoder,
                         "decoder_layers": decoder_layers, "tie_decoder": tie})
    model = build_model(cfg).double().eval()
    init_from_checkpoint(model, ckpt, {"kind": "bytes"})
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (3, 32), generator=g)
    x0[2, 20:] = ar.cfg.pad_id  # padding at the end of one row
    valid = x0 != ar.cfg.pad_id
    no_prompt = torch.zeros_like(x0, dtype=torch.bool)
    positions = torch.arange(32)
    # with one token per block and no prompt, block-causal is causal ...
    enc_mask = encoder_mask(no_prompt, valid, 1)
    assert torch.equal(enc_mask, causal_mask(valid))
    # ... so the encoder's h = enc_norm(hidden) is the AR's final-normed hidden state
    with torch.no_grad():
        h, _ = model.encode(x0, positions, enc_mask)
        ar_hidden, _ = ar.run(ar.layers, ar.embed(x0), positions, causal_mask(valid))
        torch.testing.assert_close(h, ar.norm(ar_hidden), rtol=0, atol=1e-12)
        # and the AR's next-token logits are read off h by the tied head
        torch.testing.assert_close(torch.nn.functional.linear(h, model.embed.weight), ar.logits(x0)[0])
        # with blocks of 4 the encoder sees within its block: no longer the AR's states
        h4, _ = model.encode(x0, positions, encoder_mask(no_prompt, valid, 4))
        assert not torch.allclose(h4[valid], h[valid], atol=1e-3)
    # decoder layer j starts as AR layer (1, 2) (top of 0..2) or (0, 1) (bottom): copies
    # that train apart from the encoder, or (tied) the encoder's own layer
    for j, src in enumerate((1, 2) if decoder_layers == "top" else (0, 1)):
        assert (model.decoder[j] is model.encoder[src]) == tie
        for (name, p), (_, q) in zip(model.decoder[j].named_parameters(), ar.layers[src].named_parameters()):
            assert torch.equal(p, q), name
        for (_, p), (_, q) in zip(model.decoder[j].named_parameters(), model.encoder[src].named_parameters()):
            assert (p.data_ptr() == q.data_ptr()) == tie  # untied: copies, trained apart
    assert torch.equal(model.embed.weight, ar.embed.weight) and torch.equal(model.enc_norm.weight, ar.norm.weight)


def test_shared_kv_decoder_from_ar_reads_what_its_layers_read_in_the_ar():
    # a tied shared_kv decoder at block_len = 1 without a prompt: the noisy token at position
    # 11 sees the clean tokens 0..10 through the keys/values of each decoder layer's own
    # depth, exactly what that layer read in the AR model. So the bottom decoder IS the AR's
    # first N_dec layers (its hidden state at position 11, through the final norm and head);
    # the top one is the AR's top N_dec layers fed the raw token embedding
    ar, ckpt = ar_checkpoint()
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    valid = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        ar_kv = ar.run(ar.layers, ar.embed(x), slice(0, 12), causal_mask(valid))[1]
        for layers, used in (("bottom", [0, 1]), ("top", [1, 2])):
            cfg = ModelConfig(**{**vars(ar.cfg), "model": "e2d2", "block_len": 1, "n_dec": 2, "decoder": "shared_kv",
                                 "decoder_layers": layers, "tie_decoder": True})
            model = build_model(cfg).double().eval()
            init_from_checkpoint(model, ckpt)
            logits = model.logits(x, x, torch.zeros_like(valid))[:, 11:]  # (nothing masked: the logits still run)
            z = ar.embed(x[:, 11:])  # by hand: the layers `used`, each with the AR's keys/values of 0..10
            for i in used:
                z, _ = ar.layers[i](z, *ar.rope(slice(11, 12)), None, concat_after((ar_kv[i][0][:, :, :11], ar_kv[i][1][:, :, :11])))
            torch.testing.assert_close(logits, ar.head(z), rtol=0, atol=1e-12)
            if layers == "bottom":  # the AR's own hidden state after its first two layers
                z_ar, _ = ar.run(ar.layers[:2], ar.embed(x), slice(0, 12), causal_mask(valid))
                torch.testing.assert_close(logits, ar.head(z_ar[:, 11:]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", [n for n, spec in models.MODELS.items() if spec.ar_weight is models.same_stack])
def test_one_stack_models_from_ar_take_every_layer(kind):
    ar, ckpt = ar_checkpoint()
    model = build_model(ModelConfig(**{**vars(ar.cfg), "model": kind})).double()
    init_from_checkpoint(model, ckpt)
    for name, p in model.state_dict().items():
        assert torch.equal(p, ar.state_dict()[name]), name


def test_ar_into_ar_gives_identical_logits():
    # plain fine-tuning, the paper's AR baseline: the new AR computes what the old one did
    ar, ckpt = ar_checkpoint()
    torch.manual_seed(5)
    new = build_model(ModelConfig(**{**vars(ar.cfg), "seq_len": 64})).double().eval()  # another seq_len is fine
    x = torch.randint(0, 256, (2, 20))
    assert not torch.equal(new.logits(x)[0], ar.logits(x)[0])
    init_from_checkpoint(new, ckpt)
    assert torch.equal(new.logits(x)[0], ar.logits(x)[0])


SAME_KIND = [dict(model="e2d2"), dict(model="e2d2", decoder="shared_kv", tie_decoder=True),
             dict(model="e2d2", decoder_layers="bottom", tie_decoder=True), dict(model="bd3lm"), dict(model="mdlm")]


@pytest.mark.parametrize("over", SAME_KIND, ids=lambda o: "-".join(map(str, o.values())))
def test_a_checkpoint_into_a_model_of_its_own_kind_gives_identical_logits(over):
    old = tiny(**over)
    with torch.no_grad():  # norm gains away from their initial 1, so a norm left out shows
        for p in old.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ckpt = {"config": vars(old.cfg), "model": old.state_dict(), "tokenizer": {"kind": "bytes"}}
    torch.manual_seed(9)
    new = build_model(ModelConfig(**{**vars(old.cfg), "t_min": 0.1})).double().eval()  # training settings may differ
    _, x0, x_t, prompt_mask, _ = random_layout(old)
    with torch.no_grad():
        assert not torch.equal(new.logits(x0, x_t, prompt_mask), old.logits(x0, x_t, prompt_mask))
        assert "every weight" in init_from_checkpoint(new, ckpt)
        assert torch.equal(new.logits(x0, x_t, prompt_mask), old.logits(x0, x_t, prompt_mask))
    if over.get("tie_decoder"):  # still tied after loading: one tensor, not two equal ones
        assert new.decoder[0] is new.encoder[new.pairs[0]]


def test_init_from_errors_name_what_does_not_fit():
    ar, ckpt = ar_checkpoint()
    base = {**vars(ar.cfg), "model": "e2d2"}
    cases = [({"d_model": 64}, "d_model: AR 32 vs new 64"),
             ({"n_heads": 8}, "n_heads: AR 4 vs new 8"),
             ({"rope_base": 500.0}, "rope_base: AR 10000.0 vs new 500.0"),
             ({"n_enc": 2}, "n_enc: AR 3 vs new 2"),
             ({"n_enc": 4, "n_dec": 4}, "n_enc: AR 3 vs new 4; n_dec=4: the decoder copies the AR's layers, it has only 3"),
             ({"model": "bd3lm", "n_enc": 4}, "n_enc: AR 3 vs new 4"),
             ({"model": "ar", "d_model": 16}, "d_model: AR 32 vs new 16")]
    for over, message in cases:
        with pytest.raises(ValueError, match="AR checkpoint does not fit this model .*" + re.escape(message)):
            init_from_checkpoint(build_model(ModelConfig(**{**base, **over})), ckpt)
    vocab = {**ckpt, "config": {**ckpt["config"], "eos_id": 257}}
    with pytest.raises(ValueError, match="eos_id: AR 257 vs new 258"):
        init_from_checkpoint(build_model(ModelConfig(**base)), vocab)
    # from another kind than AR, only into the same kind
    for src, target in (("e2d2", "bd3lm"), ("bd3lm", "e2d2"), ("mdlm", "ar"), ("e2d2", "ar")):
        other = {**ckpt, "config": {**ckpt["config"], "model": src}}
        with pytest.raises(ValueError, match=f"AR checkpoint .into any model. or a checkpoint of the model's own kind; "
                                             f"this one holds a '{src}' model and the new model is '{target}'"):
            init_from_checkpoint(build_model(ModelConfig(**{**base, "model": target})), other)
    # an E2D2 into an E2D2 with another decoder: the same weights would read other keys
    e2d2 = tiny(n_enc=3, n_dec=2, d_model=32)
    e_ckpt = {"config": vars(e2d2.cfg), "model": e2d2.state_dict()}
    for over, message in [({"n_dec": 1}, "n_dec: checkpoint 2 vs new 1"),
                          ({"decoder": "shared_kv"}, "decoder: checkpoint hidden vs new shared_kv"),
                          ({"decoder_layers": "bottom"}, "decoder_layers: checkpoint top vs new bottom"),
                          ({"tie_decoder": True}, "tie_decoder: checkpoint False vs new True")]:
        with pytest.raises(ValueError, match="the checkpoint does not fit this model .*" + re.escape(message)):
            init_from_checkpoint(build_model(ModelConfig(**{**vars(e2d2.cfg), **over})), e_ckpt)


def test_init_from_refuses_another_tokenizer(bpe):
    ar, ckpt = ar_checkpoint()  # trained on bytes
    model = build_model(ModelConfig(**{**vars(ar.cfg), "model": "e2d2"}))
    with pytest.raises(ValueError, match=r"the checkpoint used another tokenizer \(bytes, 260 tokens\) than this run \(bpe, 340 tokens\)"):
        init_from_checkpoint(model, ckpt, bpe.to_dict())


def test_init_from_through_train_script(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_bytes(TEXT.encode() * 3)
    ar_dir = tmp_path / "ar"
    common = [f"--data={text}", "--seq_len=32", "--d_model=32", "--n_enc=2", "--batch_size=8", "--max_steps=1",
              "--eval_every=1", "--eval_batches=1", "--eval_draws=1"]
    r = run("train.py", *common, "--model=ar", f"--out_dir={ar_dir}")
    assert r.returncode == 0, r.stderr
    ar_ckpt = str(ar_dir / "ckpt.pt")
    # the new model takes the AR's width and depth, and its tokenizer
    tc = train.TrainConfig(data=str(text), init_from=ar_ckpt, out_dir=str(tmp_path / "e"), batch_size=8)
    cfg, _, ds = train.setup(tc, {"seq_len": 32, "n_dec": 1}, "cpu")
    assert (cfg.model, cfg.d_model, cfg.n_enc, cfg.n_dec) == ("e2d2", 32, 2, 1)
    # mistakes end in one line "error: ..."
    err = script_error(train.main, [*common, "--tokenizer=bpe", f"--init_from={ar_ckpt}",
                                    f"--out_dir={tmp_path / 'x'}"], capsys)
    assert "was trained with --tokenizer=bytes, not --tokenizer=bpe" in err
    err = script_error(train.main, [*common, "--d_model=64", f"--init_from={ar_ckpt}",
                                    f"--out_dir={tmp_path / 'y'}"], capsys)
    assert "does not fit this model (d_model: AR 32 vs new 64)" in err
    err = script_error(train.main, [*common, f"--init_from={tmp_path / 'nothing.pt'}",
                                    f"--out_dir={tmp_path / 'z'}"], capsys)
    assert "no checkpoint at" in err


def test_init_from_recipe_own_kind_and_kept_checkpoints_through_train_script(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_bytes(TEXT.encode() * 3)
    common = [f"--data={text}", "--seq_len=32", "--batch_size=8", "--eval_batches=1", "--eval_draws=1", "--threads=1"]
    ar_dir, e_dir = tmp_path / "ar", tmp_path / "e"
    train.main([*common, "--model=ar", "--d_model=32", "--n_enc=3", "--max_steps=1", f"--out_dir={ar_dir}"])
    capsys.readouterr()
    # 1. from an AR checkpoint, the flags left out take the recipe, which the run says; N_dec = N / 2,
    # rounded up: 2 of the AR's 3 layers
    recipe, train_fields = {**train.INIT_RECIPE["e2d2"], "n_dec": 2}, {f.name for f in fields(train.TrainConfig)}
    train.main([*common, f"--init_from={ar_dir / 'ckpt.pt'}", "--max_steps=2", "--eval_every=1", "--keep_evals",
                f"--out_dir={e_dir}"])
    said = capsys.readouterr().out
    assert "--init_from: the fine-tuning recipe sets " + " ".join(f"--{k}={v}" for k, v in recipe.items()) in said
    ckpt = load_checkpoint(str(e_dir / "ckpt.pt"), "cpu")
    for k, v in recipe.items():
        assert (ckpt["train_config"] if k in train_fields else ckpt["config"])[k] == v, k
    assert (ckpt["config"]["d_model"], ckpt["config"]["n_enc"]) == (32, 3)  # the AR's width and depth
    # --keep_evals: every evaluation's checkpoint stays, as it was at that step
    kept = [load_checkpoint(str(e_dir / f"ckpt_{s}.pt"), "cpu") for s in (1, 2)]
    assert [k["step"] for k in kept] == [1, 2]
    assert all(torch.equal(kept[1]["model"][n], ckpt["model"][n]) for n in ckpt["model"])
    assert not all(torch.equal(kept[0]["model"][n], ckpt["model"][n]) for n in ckpt["model"])
    # 2. a flag given wins over the recipe
    train.main([*common, f"--init_from={ar_dir / 'ckpt.pt'}", "--max_steps=1", "--decoder=hidden", "--lr=5e-4",
                f"--out_dir={tmp_path / 'e2'}"])
    assert "--decoder=" not in capsys.readouterr().out.split("recipe sets")[1].splitlines()[0]
    c2 = load_checkpoint(str(tmp_path / "e2" / "ckpt.pt"), "cpu")
    assert (c2["config"]["decoder"], c2["train_config"]["lr"], c2["config"]["tie_decoder"]) == ("hidden", 5e-4, recipe["tie_decoder"])
    # 3. from a model of its own kind: its decoder and blocks, no recipe (there is nothing to choose)
    cfg, _, _ = train.setup(train.TrainConfig(data=str(text), init_from=str(e_dir / "ckpt.pt"), batch_size=8,
                                              out_dir=str(tmp_path / "e3")), {"seq_len": 32}, "cpu")
    saved = ckpt["config"]
    assert all(getattr(cfg, k) == saved[k] for k in ("n_dec", "decoder", "decoder_layers", "tie_decoder", "block_len"))
    assert train.with_init_recipe({}, {"init_from": str(e_dir / "ckpt.pt")})[2] == {}
    assert train.with_init_recipe({}, {"init_from": str(ar_dir / "ckpt.pt"), "resume": True})[2] == {}
    # 4. from another kind than AR or its own: one line that says what is allowed
    err = script_error(train.main, [*common, "--model=bd3lm", f"--init_from={e_dir / 'ckpt.pt'}",
                                    f"--out_dir={tmp_path / 'b'}"], capsys)
    assert "error: --init_from takes an AR checkpoint (into any model) or a checkpoint of the model's own kind; " \
           "this one holds a 'e2d2' model and the new model is 'bd3lm'" in err


# --- nucleus (top-p) sampling ---------------------------------------------------------

def test_nucleus_keeps_the_smallest_set_that_reaches_top_p():
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert torch.equal(nucleus(p, 0.6) > 0, torch.tensor([[False, True, False, True]]))
    assert torch.equal(nucleus(p, 0.5) > 0, torch.tensor([[False, True, False, False]]))
    assert torch.equal(nucleus(p, 0.85) > 0, torch.tensor([[True, True, False, True]]))
    torch.testing.assert_close(nucleus(p, 0.6), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    assert nucleus(p, 1.0) is p


def test_tokens_outside_the_nucleus_are_never_drawn():
    cfg = ModelConfig()
    logits = torch.full((1, 1, cfg.vocab_size), -4.0)
    logits[..., 10], logits[..., 11], logits[..., 12] = 3.0, 2.5, 2.0  # the nucleus at top_p=0.5: {10, 11}
    probs = torch.softmax(logits, -1)
    assert probs[..., 10] < 0.5 < probs[..., 10] + probs[..., 11]
    x = torch.full((4000, 1), cfg.mask_id)
    g = torch.Generator().manual_seed(0)

    def draw(top_p):
        return denoise_step(logits.expand(4000, 1, -1), x, 0.0, 1.0, cfg.mask_id, "remask", 1.0, top_p,
                            generator=g, final=True).flatten()

    assert set(draw(0.5).tolist()) == {10, 11}  # both drawn, nothing else
    assert len(set(draw(1.0).tolist()) - {10, 11}) > 10  # without it the tail is drawn


def test_generate_samples_only_from_the_nucleus_for_every_model():
    ar = tiny("ar")
    with torch.no_grad():
        ar.embed.weight.mul_(8)  # sharper logits, so a nucleus is a small set
    prompt = [5, 6, 7]
    probs = torch.softmax(ar.logits(torch.tensor([prompt]))[0][0, -1].double(), -1)
    allowed = set((nucleus(probs[None], 0.6)[0] > 0).nonzero().flatten().tolist())
    assert 1 < len(allowed) < 100
    g = torch.Generator().manual_seed(0)
    out = generate(ar, [prompt] * 300, max_new_tokens=1, temperature=1.0, top_p=0.6, generator=g, stop_at_eos=False)
    drawn = {t[0] for t in out.tokens}
    assert drawn <= allowed and len(drawn) > 1
    out = generate(ar, [prompt] * 300, max_new_tokens=1, temperature=1.0, generator=g, stop_at_eos=False)
    assert {t[0] for t in out.tokens} - allowed  # top_p = 1 draws outside it
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(tiny(), [prompt], top_p=0.0)
