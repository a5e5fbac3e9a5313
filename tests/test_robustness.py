"""Real data, several processes, interruption and bad input: nothing may lose work or end
in a torch stack trace."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import sample
import train
from conftest import ENV, ROOT, SMALL, log_losses, run, script_error, weights
from models import (autocast_for, config_from_dict, load_checkpoint, model_from_checkpoint, peak_bf16_tflops,
                    pick_device)


# --- user data ------------------------------------------------------------------------


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_train_on_text_jsonl_and_tsv_files(root, tmp_path):
    text = write(tmp_path / "book.txt", "the quick brown fox jumps over the lazy dog. " * 60)
    jsonl = write(tmp_path / "pairs.jsonl", "".join(
        json.dumps({"source": f"{n}=", "target": data.number_to_words(n)}) + "\n" for n in range(60)))
    tsv = write(tmp_path / "pairs.tsv", "".join(f"{n}=\t{n * 2}\n" for n in range(60)))
    for path, kind in [(text, "text"), (jsonl, "pairs"), (tsv, "pairs")]:
        out = tmp_path / ("out_" + os.path.basename(path))
        r = run("train.py", f"--data={path}", "--max_steps=6", "--eval_every=3", "--batch_size=8",
                "--seq_len=64" if kind == "text" else "--block_len=4", f"--out_dir={out}", *SMALL)
        assert r.returncode == 0, r.stderr
        last = r.stdout.strip().splitlines()[-1]
        assert last.startswith("final step=6 val_nelbo=")
        assert last.endswith("exact_match=nan") == (kind == "text")
        assert len(log_losses(out)) == 6
        # sample.py --eval on the same kind of file
        r = run("sample.py", f"--ckpt={out}/ckpt.pt", f"--eval={path}")
        assert r.returncode == 0, r.stderr
        if kind == "text":  # every figure with its standard error
            assert re.search(r"NELBO \d+\.\d+ ± \d+\.\d+ nats/byte, \d+\.\d+ ± \d+\.\d+ bits/byte, "
                             r"perplexity <= \d+\.\d+ ± \d+\.\d+", r.stdout), r.stdout
        else:
            assert "exact match" in r.stdout and "BLEU" in r.stdout and "ROUGE-L" in r.stdout


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"source": "a", "target": "b"}\n\n{"source": "c", "target": \n', r"bad.jsonl:3: not valid JSON"),
    ("bad.jsonl", '{"source": "a", "target": "b"}\n{"source": "c"}\n', r"bad.jsonl:2: expected an object"),
    ("bad.tsv", "a\tb\nc\td\te\n", r"bad.tsv:2: expected 2 tab-separated columns \(source, target\), found 3"),
    ("empty.jsonl", "\n\n", r"empty.jsonl: the file has no examples"),
    ("empty.txt", "", r"empty.txt: the file is empty"),
])
def test_malformed_files_name_the_line(tmp_path, capsys, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(ValueError, match=message):
        if name.endswith(".txt"):
            data.TextData(path, 16)
        else:
            data.read_pairs(path)
    assert name in script_error(train.main, [f"--data={path}", "--max_steps=1", f"--out_dir={tmp_path}/o"], capsys)


def test_too_long_examples_are_skipped_and_counted_or_fail(tmp_path, root):
    path = write(tmp_path / "p.tsv", "1\tone\n2\ttwo\n" + "3\t" + "x" * 40 + "\n" + "4\tfour\n" * 5)
    settings = dict(task="", digits=0, data=path, data_format="auto", val_fraction=0.1, too_long="skip")
    ds, seq_len = data.load_dataset(settings, block_len=4, seq_len=16)
    assert ds.skipped == 1 and len(ds.train) + len(ds.val) == 7 and seq_len == 16
    assert data.load_dataset(settings, block_len=4)[1] == 48  # no seq_len given: the longest example
    with pytest.raises(ValueError, match=r"p.tsv: example 3 needs 48 positions .* more than seq_len=16"):
        data.load_dataset({**settings, "too_long": "error"}, block_len=4, seq_len=16)
    r = run("train.py", f"--data={path}", "--seq_len=16", "--block_len=4", "--max_steps=2",
            "--batch_size=4", f"--out_dir={tmp_path}/o", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 examples" in r.stdout


# --- metrics --------------------------------------------------------------------------


def test_bleu_matches_hand_computed_values():
    assert data.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat": 6 words each (no brevity
    # penalty); matches 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert data.corpus_bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(expected)
    # clipping: "the the the the" vs "the cat" matches one "the", not four (the smoothing
    # of the orders without a match is checked in test_cli.py)
    assert data.corpus_bleu(["the the the the"], ["the cat"]) == pytest.approx((1 / 4 / 6 / 8 / 8) ** 0.25)
    # brevity penalty over the corpus: c = 4 + 4, r = 4 + 6, all n-grams of the hyps match
    hyps, refs = ["a b c d", "e f g h"], ["a b c d", "e f g h i j"]
    assert data.corpus_bleu(hyps, refs) == pytest.approx(__import__("math").exp(1 - 10 / 8))


def test_rouge_l_matches_hand_computed_values():
    # LCS("a b c d", "a c d e") = "a c d" = 3; P = 3/4, R = 3/4, F1 = 0.75
    assert data.rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(0.75)
    # LCS("the cat", "the big cat sat") = 2; P = 1, R = 1/2, F1 = 2/3; mean with a perfect pair
    assert data.rouge_l(["the cat", "x"], ["the big cat sat", "x"]) == pytest.approx((2 / 3 + 1) / 2)
    assert data.rouge_l(["a"], ["b"]) == 0.0


# --- several processes ----------------------------------------------------------------


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(root, tmp_path):
    common = ["--max_steps=6", "--eval_every=6", "--batch_size=8", "--digits=2", *SMALL]
    one = run("train.py", "--grad_accum=2", f"--out_dir={tmp_path}/one", *common)
    assert one.returncode == 0, one.stderr
    two = run("--standalone", "--nproc_per_node=2", "train.py", f"--out_dir={tmp_path}/two",
              *common, cmd=[sys.executable, "-m", "torch.distributed.run"])
    assert two.returncode == 0, two.stderr
    assert "processes=2 (gloo)" in two.stdout and two.stdout.count("final step=6") == 1  # rank 0 only
    a, b = log_losses(tmp_path / "one"), log_losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-5)
    for (name, p), q in zip(weights(tmp_path / "one").items(), weights(tmp_path / "two").values()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name


# --- interruption and resume ----------------------------------------------------------

RESUME = ["--max_steps=300", "--eval_every=20", "--batch_size=16", "--digits=2", *SMALL]


def start_and_kill(out, sig, after_step):
    """Start a training run, wait until it has logged `after_step`, send it `sig`."""
    p = subprocess.Popen([sys.executable, "train.py", f"--out_dir={out}", *RESUME], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    while not (os.path.exists(log) and len(log_losses(out)) >= after_step):  # no time limit
        if p.poll() is not None:
            pytest.fail("the run ended before it could be interrupted:\n" + p.stderr.read())
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, stderr = p.communicate()
    return p.returncode, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    r = run("train.py", f"--out_dir={out}", *RESUME)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_weights(root, tmp_path, uninterrupted, sig):
    out = tmp_path / "killed"
    code, stdout, _ = start_and_kill(out, sig, after_step=50)
    if sig == signal.SIGTERM:  # graceful: saves the step it was at, exit code 130
        assert code == 130 and "continue with --resume" in stdout
        saved = torch.load(out / "ckpt.pt", weights_only=False)["step"]
        assert 50 <= saved < 300
    else:  # SIGKILL: nothing runs; the last periodic checkpoint is intact (atomic write)
        assert code == -signal.SIGKILL
        assert torch.load(out / "ckpt.pt", weights_only=False)["step"] % 20 == 0
    r = run("train.py", f"--out_dir={out}", "--resume", *RESUME)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "final step=300" in r.stdout
    for (name, p), q in zip(weights(uninterrupted).items(), weights(out).values()):
        assert torch.equal(p, q), name
    assert log_losses(out) == log_losses(uninterrupted)  # the log was rewritten past the ckpt


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(root, tmp_path):
    r = run("train.py", "--lr=1e12", "--warmup_steps=1", "--max_steps=50", "--eval_every=1",
            "--grad_clip=1e12", "--batch_size=8", "--digits=2", f"--out_dir={tmp_path}", *SMALL)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: the loss became nan" in r.stderr or "error: the loss became inf" in r.stderr
    assert "the last good checkpoint is" in r.stderr
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    failed_at = int(r.stderr.split(" at step ")[1].split(":")[0])
    assert ckpt["step"] == failed_at - 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# --- clear errors ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ar_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ar")
    r = run("train.py", "--model=ar",
            "--max_steps=2", "--eval_every=2", "--batch_size=4", f"--out_dir={out}", *SMALL)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("args,message", [
    (["--resume", "--model=e2d2"], "holds a 'ar' model, not 'e2d2'"),
    (["--resume", "--d_model=64"], "--resume keeps the checkpoint's model config"),
])
def test_resume_with_another_model_is_a_clear_error(ar_checkpoint, capsys, args, message):
    assert message in script_error(train.main, [f"--out_dir={ar_checkpoint}", *args], capsys)


def test_sample_script_bad_input_is_a_clear_error(ar_checkpoint, tmp_path, capsys):
    ck = f"--ckpt={ar_checkpoint}/ckpt.pt"
    cases = [([ck, "--model=e2d2", "1+1="], "holds a 'ar' model, not 'e2d2'"),
             ([ck, "9" * 40], "leaves no room to generate"),
             ([ck, "--max_new_tokens=100", "1+1="], "max_new_tokens=100 must be between 1 and")]
    bad = tmp_path / "unknown_key.pt"
    ckpt = torch.load(f"{ar_checkpoint}/ckpt.pt", weights_only=False)
    ckpt["config"]["n_layers"] = 3
    torch.save(ckpt, bad)
    cases.append(([f"--ckpt={bad}", "1+1="], "unknown keys ['n_layers']"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(f"{ar_checkpoint}/ckpt.pt", "rb").read()[:1000])  # truncated
    cases.append(([f"--ckpt={corrupt}", "1+1="], "cannot read checkpoint"))
    not_torch = tmp_path / "bad.pt"
    not_torch.write_bytes(b"not a checkpoint")
    cases.append(([f"--ckpt={not_torch}", "1+1="], "cannot read checkpoint"))
    cases.append(([f"--ckpt={tmp_path}/none.pt", "1+1="], "no checkpoint at"))
    cases.append(([ck, "--device=gpu", "1+1="], "--device must be auto, cpu, cuda or cuda:N"))
    for args, message in cases:
        assert message in script_error(sample.main, args, capsys), args


@pytest.mark.parametrize("args,message", [
    (["--n_layers=3"], "unrecognized arguments: --n_layers=3"),
    (["--bogus=1"], "unrecognized arguments"),
    (["--n_dec=two"], "invalid int value"),
    (["--seq_len=30", "--block_len=4"], "seq_len=30 is not a multiple of block_len=4"),
    (["--d_model=100", "--n_heads=3"], "d_model=100 is not divisible by n_heads=3"),
    (["--d_model=30"], "not divisible by n_heads"),
    (["--decoder=shared_kv", "--n_enc=2", "--n_dec=3"], "needs n_dec <= n_enc"),
    (["--model=gpt"], "invalid choice: 'gpt' (choose from 'e2d2', 'ar', 'mdlm', 'bd3lm')"),
    (["--task=sorting"], "invalid choice: 'sorting'"),
    (["--batch_size=10", "--grad_accum=4"], "must split evenly into 4 micro-batches"),
    (["--data=/nonexistent.txt"], "/nonexistent.txt: no such file"),
    (["--resume", "--out_dir=/nonexistent/x"], "no checkpoint at"),
    (["--resume", "CORRUPT"], "cannot read checkpoint"),
    (["--device=gpu"], "--device must be auto, cpu, cuda or cuda:N"),
])
def test_train_script_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    if "CORRUPT" in args:  # a checkpoint file that is not one
        (tmp_path / "ckpt.pt").write_bytes(b"\x80\x02garbage")
        args = [a for a in args if a != "CORRUPT"]
    out_dir = [] if any(a.startswith("--out_dir") for a in args) else [f"--out_dir={tmp_path}"]
    assert message in script_error(train.main, ["--max_steps=1", *out_dir, *args], capsys)


def test_config_from_a_checkpoint_is_validated():
    with pytest.raises(ValueError, match="unknown keys"):
        config_from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="not a multiple"):
        config_from_dict({"seq_len": 10, "block_len": 4})


# --- devices, signals, old checkpoints ------------------------------------------------


def test_device_flag_parsing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert pick_device("cpu") == "cpu" and pick_device("cuda:0") == "cuda:0"
    assert pick_device("cuda", local_rank=1) == "cuda:1"  # torchrun: the local rank's GPU
    assert pick_device("cuda:0", local_rank=3) == "cuda:3"
    assert pick_device("cpu", local_rank=1) == "cpu"  # gloo processes stay on the CPU
    assert pick_device("auto") == "cuda" and pick_device("auto", local_rank=2) == "cuda:2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build
    assert pick_device("auto", local_rank=2) == "cpu"
    for asked in ("cuda", "cuda:0"):  # a clear error now, not a traceback at the first tensor
        with pytest.raises(ValueError, match="sees no CUDA GPU.*use --device=cpu"):
            pick_device(asked)
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
            pick_device(bad)


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
def test_dtype_picks_the_autocast_of_every_device():
    # --dtype=auto: bf16 autocast on every CUDA device, float32 on the CPU; bfloat16 asks for
    # bf16 autocast on either, float32 for none; anything else is a clear error
    def is_bf16(ac, device_type):
        return isinstance(ac, torch.autocast) and ac.device == device_type and ac.fast_dtype == torch.bfloat16
    for device in ("cuda", "cuda:0", "cuda:1"):
        assert is_bf16(autocast_for(device), "cuda") and is_bf16(autocast_for(device, "bfloat16"), "cuda")
        assert not isinstance(autocast_for(device, "float32"), torch.autocast)
    assert is_bf16(autocast_for("cpu", "bfloat16"), "cpu")
    assert not any(isinstance(autocast_for("cpu", dtype), torch.autocast) for dtype in ("auto", "float32"))
    with pytest.raises(ValueError, match="--dtype must be one of auto, float32, bfloat16, got 'fp16'"):
        autocast_for("cpu", "fp16")


def test_mfu_peak_of_known_gpus(monkeypatch):
    # NVIDIA's dense bf16 figures, found by the name torch reports; an unknown GPU has none
    for name, peak in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
                       ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312),
                       ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121), ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert peak_bf16_tflops("cuda:0") == peak, name
    assert peak_bf16_tflops("cpu") is None


def test_train_called_from_code_leaves_the_signal_handlers_alone(tmp_path):
    # only main() installs the Ctrl-C / SIGTERM handlers; a test or a notebook that
    # imports train() keeps its own, during and after training
    sigs = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in sigs}
    seen = []

    class Spy(data.TaskData):
        def train_examples(self, *args):
            seen.append({s: signal.getsignal(s) for s in sigs})
            return super().train_examples(*args)

    tc = train.TrainConfig(digits=2, max_steps=3, batch_size=8, eval_every=3, eval_examples=4,
                           eval_batches=1, out_dir=str(tmp_path))
    cfg, _, ds = train.setup(tc, dict(d_model=32, n_enc=2, n_dec=1), "cpu")
    train.train(cfg, tc, "cpu", None, Spy(ds.task, ds.tok))
    assert len(seen) == 3 and all(s == before for s in seen)
    assert {s: signal.getsignal(s) for s in sigs} == before


def test_prompt_attention_follows_the_data_and_old_checkpoints(tmp_path):
    text = write(tmp_path / "book.txt", "the quick brown fox. " * 40)
    pairs = write(tmp_path / "p.tsv", "".join(f"{n}=\t{n * 2}\n" for n in range(40)))
    for path, expected in [("", "bidirectional"), (text, "block_causal"), (pairs, "bidirectional")]:
        tc = train.TrainConfig(data=path, out_dir=str(tmp_path))
        cfg, _, _ = train.setup(tc, {"seq_len": 64} if path == text else {}, "cpu")
        assert cfg.prompt_attention == expected, path
    with pytest.raises(ValueError, match="prompt_attention is set by the data"):
        train.setup(train.TrainConfig(data=text), {"seq_len": 64, "prompt_attention": "bidirectional"}, "cpu")
    # a checkpoint saved before the field existed: from its training config
    assert data.prompt_attention_of({"data": text}) == "block_causal"
    with pytest.raises(ValueError, match="unknown pairs file type '.txt'"):  # pairs need a pairs extension
        data.prompt_attention_of({"data": text, "data_format": "pairs"})
    assert data.prompt_attention_of({"data": pairs}) == data.prompt_attention_of({}) == "bidirectional"
    assert config_from_dict({}, "block_causal").prompt_attention == "block_causal"
    assert config_from_dict({"prompt_attention": "bidirectional"}, "block_causal").prompt_attention == "bidirectional"


def test_sample_reads_an_old_text_checkpoint_block_causally(root, tmp_path):
    text = write(tmp_path / "book.txt", "the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "run"
    r = run("train.py", f"--data={text}", "--seq_len=32", "--max_steps=1", "--batch_size=4",
            f"--out_dir={out}", *SMALL)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["prompt_attention"] == "block_causal"
    del ckpt["config"]["prompt_attention"]  # as saved before the field existed
    torch.save(ckpt, out / "old.pt")
    model = model_from_checkpoint(load_checkpoint(str(out / "old.pt"), "cpu"), "cpu")
    assert model.cfg.prompt_attention == "block_causal"
