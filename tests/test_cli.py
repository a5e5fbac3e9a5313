"""A run's folder, its resume, its flags, its threads and its inputs: nothing a user does
may lose work or train wrongly in silence."""
import errno
import io
import json
import math
import os
import re
import subprocess
import sys
import time
import weakref

import pytest
import torch
import torch.distributed as dist

import bench
import data
import finetune
import models
import sample
import train
from conftest import ENV, ROOT, SMALL, run, script_error
from models import load_checkpoint, model_from_checkpoint

# a run of a few steps on the built-in task with a tiny model
TINY = ["--digits=2", "--batch_size=8", "--eval_every=2", *SMALL]


def train_in(out_dir, *flags):
    """python train.py <flags> --out_dir=out_dir, in this process (no interpreter start-up)."""
    train.main([*TINY, "--max_steps=2", f"--out_dir={out_dir}", *flags])


# --- losing work ----------------------------------------------------------------------


def test_a_new_run_refuses_a_folder_that_holds_a_checkpoint(tmp_path, capsys):
    train_in(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    message = script_error(train.main, [*TINY, "--max_steps=2", f"--out_dir={tmp_path}"], capsys)
    assert f"{tmp_path} already holds a checkpoint" in message
    assert "--resume" in message and "--overwrite" in message
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # untouched
    train_in(tmp_path, "--overwrite", "--seed=7")  # the explicit way to start over
    assert load_checkpoint(str(tmp_path / "ckpt.pt"), "cpu")["train_config"]["seed"] == 7


def test_resume_restores_the_whole_training_config(tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{n}=\t{n * 3}\n" for n in range(40)))
    out = tmp_path / "run"
    train_in(out, f"--data={pairs}", "--seed=5", "--lr=1e-3")
    # --resume alone: the data file, the seed and the optimiser come from the checkpoint,
    # not from the defaults (which would train the built-in addition task instead)
    train.main([f"--out_dir={out}", "--resume", "--max_steps=4"])
    tc = load_checkpoint(str(out / "ckpt.pt"), "cpu")["train_config"]
    assert (tc["data"], tc["seed"], tc["lr"], tc["max_steps"]) == (str(pairs), 5, 1e-3, 4)
    assert json.loads((out / "config.json").read_text())["train"]["data"] == str(pairs)
    assert "pairs.tsv" in capsys.readouterr().out  # the run line names the file it trains on
    # a flag given again with another value: an error naming both values
    message = script_error(train.main, [f"--out_dir={out}", "--resume", "--max_steps=6", "--seed=6",
                                        "--batch_size=16"], capsys)
    assert "--seed=6 (the checkpoint has 5)" in message and "--batch_size=16 (the checkpoint has 8)" in message
    assert "Only these may change on resume" in message and "max_steps" in message
    # the same value again is fine, and so is a flag that may change
    train.main([f"--out_dir={out}", "--resume", "--max_steps=5", "--seed=5", "--eval_every=5"])
    assert load_checkpoint(str(out / "ckpt.pt"), "cpu")["step"] == 5
    # --help says which flags may change
    resume_help = next(a.help for a in train.build_parser()._actions if a.dest == "resume")
    assert all(f"--{name}" in resume_help for name in train.MAY_CHANGE_ON_RESUME if name != "resume")


def test_resume_of_a_checkpoint_older_than_a_flag_keeps_the_flags_default(tmp_path, capsys):
    # a checkpoint written before --train_loss existed trained with the default objective:
    # resuming it with another value is the usual clash, never a silent change of objective
    out = tmp_path / "run"
    train_in(out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    del ckpt["train_config"]["train_loss"], ckpt["train_config"]["too_long"]  # as an older run saved it
    torch.save(ckpt, out / "ckpt.pt")
    message = script_error(train.main, [f"--out_dir={out}", "--resume", "--max_steps=3", "--train_loss=nelbo"], capsys)
    assert "--train_loss='nelbo' (the checkpoint has 'masked_ce')" in message
    train.main([f"--out_dir={out}", "--resume", "--max_steps=3", "--train_loss=masked_ce", "--too_long=skip"])
    assert load_checkpoint(str(out / "ckpt.pt"), "cpu")["train_config"]["train_loss"] == "masked_ce"


def flip_a_weight_byte(path):
    """Flip one byte in the middle of the largest stored tensor of a checkpoint file (its
    bytes are stored as they are in memory inside the zip archive)."""
    weights = torch.load(path, weights_only=False)["model"]
    name = max(weights, key=lambda k: weights[k].numel())
    stored = weights[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    raw = bytearray(open(path, "rb").read())
    at = raw.find(stored)
    assert at >= 0 and raw.find(stored, at + 1) < 0
    raw[at + len(stored) // 2] ^= 0x10
    open(path, "wb").write(bytes(raw))


def test_a_checkpoint_with_flipped_bytes_in_its_weights_is_refused(tmp_path, capsys):
    train_in(tmp_path)
    load_checkpoint(str(tmp_path / "ckpt.pt"), "cpu")  # intact: loads
    flip_a_weight_byte(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="do not match the checksum"):
        load_checkpoint(str(tmp_path / "ckpt.pt"), "cpu")
    assert "do not match the checksum" in script_error(
        sample.main, [f"--ckpt={tmp_path}/ckpt.pt", "1+1="], capsys)
    assert "do not match the checksum" in script_error(
        train.main, [f"--out_dir={tmp_path}", "--resume", "--max_steps=3"], capsys)


def test_a_failed_checkpoint_write_keeps_the_old_one_and_leaves_no_tmp(tmp_path, monkeypatch):
    train_in(tmp_path)
    path = str(tmp_path / "ckpt.pt")
    old = open(path, "rb").read()
    model = model_from_checkpoint(load_checkpoint(path, "cpu"), "cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # writes half a file, then the disk is full
        real_save({"partial": torch.zeros(1000)}, f)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ValueError, match=r"cannot write the checkpoint .*No space left on device "
                                         r"\(the previous checkpoint is intact\)"):
        train.save_checkpoint(path, model, optimizer, 3, train.TrainConfig(), {})
    assert open(path, "rb").read() == old
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "ckpt.pt", "config.json", "log.jsonl"]  # no .tmp


def test_an_out_dir_that_cannot_be_written_is_a_clear_error(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("not a folder")
    assert f"--out_dir={a_file} is a file, not a folder" in script_error(
        train.main, [*TINY, "--max_steps=1", f"--out_dir={a_file}"], capsys)
    assert f"cannot write to --out_dir={a_file}/sub" in script_error(
        train.main, [*TINY, "--max_steps=1", f"--out_dir={a_file}/sub"], capsys)
    if os.geteuid() != 0:  # (root may write anywhere)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write to --out_dir" in script_error(
            train.main, [*TINY, "--max_steps=1", f"--out_dir={locked}"], capsys)


def test_save_every_and_the_best_checkpoint(tmp_path, monkeypatch):
    saved = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint",
                        lambda path, *a, **k: (saved.append((os.path.basename(path), a[2])), real(path, *a, **k)))
    train_in(tmp_path, "--max_steps=9", "--eval_every=3", "--save_every=2", "--lr=0.05", "--warmup_steps=0")
    assert [s for name, s in saved if name == "ckpt.pt"] == [2, 3, 4, 6, 8, 9]  # every 2 and every eval
    evals = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "val_nelbo" in line]
    assert [e["step"] for e in evals] == [0, 3, 6, 9]  # step 0: where training started (logged only)
    evals = evals[1:]
    best_step = min(evals, key=lambda e: e["val_nelbo"])["step"]
    best = load_checkpoint(str(tmp_path / "best.pt"), "cpu")
    assert best["step"] == best_step
    assert best["metrics"]["val_nelbo"] == min(e["val_nelbo"] for e in evals)
    assert load_checkpoint(str(tmp_path / "ckpt.pt"), "cpu")["step"] == 9
    # best.pt is written exactly when the validation NELBO improved
    improved = [e["step"] for i, e in enumerate(evals) if e["val_nelbo"] < min([math.inf] + [f["val_nelbo"] for f in evals[:i]])]
    assert [s for name, s in saved if name == "best.pt"] == improved


def test_config_json_and_a_timestamp_in_every_log_row(tmp_path):
    train_in(tmp_path, "--lr=0.004", "--n_dec=1")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["train"]["lr"] == 0.004 and written["train"]["out_dir"] == str(tmp_path)
    assert written["model"]["n_dec"] == 1 and written["model"]["seq_len"] == 12  # derived from the data (8 + 4)
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(rows) == 4  # the evaluation at step 0, two steps and one evaluation
    assert [r["step"] for r in rows] == [0, 1, 2, 2] and "val_nelbo" in rows[0] and "loss" in rows[1]
    for row in rows:
        t = time.strptime(row["time"], "%Y-%m-%dT%H:%M:%SZ")
        assert abs(time.mktime(t) - time.mktime(time.gmtime())) < 24 * 3600  # today, in UTC


# --- training wrongly without an error ------------------------------------------------


@pytest.mark.parametrize("flag,message", [
    ("--grad_clip=-1", "--grad_clip=-1.0 must be > 0"),
    ("--grad_clip=0", "--grad_clip=0.0 must be > 0"),
    ("--max_steps=0", "--max_steps=0 must be >= 1"),
    ("--eval_every=0", "--eval_every=0 must be >= 1"),
    ("--val_fraction=1.5", "--val_fraction=1.5 must be in (0, 1)"),
    ("--val_fraction=0", "--val_fraction=0.0 must be in (0, 1)"),
    ("--val_fraction=1", "--val_fraction=1.0 must be in (0, 1)"),
    ("--batch_size=0", "--batch_size=0 must be >= 1"),
    ("--batch_size=-8", "--batch_size=-8 must be >= 1"),
    ("--save_every=-1", "--save_every=-1 must be >= 0"),
    ("--threads=-2", "--threads=-2 must be >= 0"),
    ("--device=mps", "--device must be auto, cpu, cuda or cuda:N"),
    ("--dtype=fp16", "argument --dtype: invalid choice: 'fp16' (choose from 'auto', 'float32', 'bfloat16')"),
    ("--peak_tflops=-1", "--peak_tflops=-1.0 must be >= 0"),
    ("--max_step=3", "unrecognized arguments: --max_step=3"),  # no prefix matching
])
def test_train_flags_are_checked_before_the_first_step(tmp_path, capsys, flag, message):
    pairs = tmp_path / "p.tsv"
    pairs.write_text("".join(f"{n}=\t{n}\n" for n in range(20)))
    flags = ["--max_steps=1", f"--data={pairs}", f"--out_dir={tmp_path}/o", *SMALL, flag]
    assert message in script_error(train.main, flags, capsys)
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


def test_a_cuda_device_on_a_build_without_cuda_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU build
    for main, argv in [(train.main, [f"--out_dir={tmp_path}", "--max_steps=1"]),
                       (sample.main, ["1+1="]), (bench.main, ["train"])]:
        assert "--device=cuda: this torch build sees no CUDA GPU" in script_error(main, [*argv, "--device=cuda"], capsys)


@pytest.mark.parametrize("flags,message", [
    (["--batch_size=0"], "--batch_size=0 must be >= 1"),
    (["--num_examples=0"], "--num_examples=0 must be >= 1"),
    (["--steps=0"], "--steps=0 must be >= 1"),
    (["--eval_draws=0"], "--eval_draws=0 must be >= 1"),
    (["--temperature=-1"], "--temperature=-1.0 must be >= 0"),
    (["--threshold=1.5"], "--threshold=1.5 must be in (0, 1]"),
    (["--num_example=3"], "unrecognized arguments: --num_example=3"),
    (["--compile", "--eval=pairs.jsonl"], "--compile speeds up answering prompts; leave it out with --eval"),
    (["--dtype=half"], "argument --dtype: invalid choice: 'half' (choose from 'auto', 'float32', 'bfloat16')"),
])
def test_sample_flags_are_checked(capsys, flags, message):
    # checked before the checkpoint is read: no checkpoint is needed to see the error
    assert message in script_error(sample.main, ["--ckpt=/nonexistent.pt", *flags], capsys)


@pytest.mark.parametrize("flags,message", [
    (["train", "--batch=0"], "--batch=0 must be >= 1"),
    (["sample", "--batches=1,0"], "--batches=1,0 must be batch sizes >= 1"),
    (["sample", "--batches=1,x"], "--batches=1,x must be batch sizes >= 1"),
    (["train", "--repeats=0"], "--repeats=0 must be >= 1"),
    (["train", "--repeat=3"], "unrecognized arguments: --repeat=3"),
    (["sample", "--dtype=bf16"], "argument --dtype: invalid choice: 'bf16' (choose from 'auto', 'float32', 'bfloat16')"),
    (["speedup", "--against=HEAD", "--dtype=bfloat16"], "speedup times the float32 samplers"),
])
def test_bench_flags_are_checked(capsys, flags, message):
    assert message in script_error(bench.main, flags, capsys)


@pytest.mark.parametrize("flags,message", [
    (["--jobs=0"], "--jobs=0 must be >= 1"),
    (["--repeats=0"], "--repeats=0 must be >= 1"),
    (["--stage=nope"], "--stage must be all, seeds, ar_speed, recipe, recipe_table or one of ('pretrain'"),
    (["--stage=eval", "--repeat=3"], "unrecognized arguments: --repeat=3"),
])
def test_finetune_flags_are_checked(capsys, flags, message):
    # checked before anything is written: no task files, no runs
    assert message in script_error(finetune.main, flags, capsys)


# --- threads and load -----------------------------------------------------------------


def test_threads_flag_of_every_script(tmp_path, capsys):
    assert torch.get_num_threads() == 1  # the suite pins its own threads (conftest.py)
    try:
        for main, argv in [(train.main, ["--threads=2", "--data=/nonexistent.txt", f"--out_dir={tmp_path}"]),
                           (sample.main, ["--threads=2", "--ckpt=/nonexistent.pt", "1+1="]),
                           (bench.main, ["train", "--threads=2", "--device=gpu"]),
                           (finetune.main, ["--threads=2", "--stage=nope"])]:
            torch.set_num_threads(1)
            script_error(main, argv, capsys)  # each stops at a later error, threads already set
            assert torch.get_num_threads() == 2, main.__module__
    finally:
        torch.set_num_threads(1)
    # the scripts the tests start run with one thread too
    r = run("-c", "import torch; print(torch.get_num_threads())")
    assert r.stdout.strip() == "1"


# --- precision ------------------------------------------------------------------------


def test_dtype_flag_of_every_script(tmp_path, monkeypatch, capsys, addition_checkpoint):
    # --dtype=bfloat16 runs every model call of a script under bf16 autocast, on the CPU too;
    # the default (auto) runs the CPU in float32. Seen from inside: a hook on every module
    # call records the precision autocast is set to at that moment.
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: seen.add(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32))
    monkeypatch.setattr(bench, "BENCH_MODEL", dict(d_model=32, n_heads=4, n_enc=2, n_dec=1, block_len=4, seq_len=24))
    try:
        for dtype, want in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
            flag = f"--dtype={dtype}"
            scripts = {"train.py": lambda: train_in(tmp_path / dtype, flag),
                       "sample.py": lambda: sample.main([f"--ckpt={addition_checkpoint}", "1+1=", flag]),
                       "bench.py": lambda: bench.main(["train", "--batch=2", "--repeats=1", flag])}
            for name, script in scripts.items():
                seen.clear()
                script()
                assert seen == {want}, (name, flag)
    finally:
        hook.remove()
    assert "dtype=bfloat16" in capsys.readouterr().out  # bench.py says which precision it timed


def test_training_reports_model_flops_and_mfu_against_a_given_peak(tmp_path, capsys):
    # On a GPU of known peak train.py reports MFU by itself; --peak_tflops gives the peak of
    # any device (the CPU here): every evaluation line then carries the speed and MFU so far
    train_in(tmp_path, "--peak_tflops=0.5")
    out = capsys.readouterr().out
    assert "MFU against a peak of 0.5 TFLOP/s per device (--peak_tflops) on the CPU" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 0: ") and "tokens/s" not in lines[0]  # before training
    assert re.search(r"; training \d+ tokens/s, [\d.e-]+ model TFLOP/s, MFU [\d.]+% "
                     r"\(of 0.5 TFLOP/s per device\)$", lines[1]), lines
    with open(tmp_path / "log.jsonl") as f:
        m = [json.loads(line) for line in f][-1]  # the evaluation's row
    assert m["mfu"] == pytest.approx(m["train_tflops_per_s"] / 0.5) and m["train_tflops_per_s"] > 0
    # tokens/s and FLOP/s are of the same steps: their ratio is the FLOPs per token of batches
    # of the addition task's lengths (whole blocks of 4, at most seq_len = 12)
    per_token = m["train_tflops_per_s"] * 1e12 / m["train_tokens_per_s"]
    model = model_from_checkpoint(load_checkpoint(str(tmp_path / "ckpt.pt"), "cpu"), "cpu")
    lengths = [models.train_flops_per_token(model, L) for L in (4, 8, 12)]
    assert min(lengths) * (1 - 1e-9) <= per_token <= max(lengths) * (1 + 1e-9)  # (float rounding of the ratio)


@pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")
def test_leaving_the_process_group_frees_what_still_holds_it(tmp_path):
    # a DDP wrapper caught in a reference cycle holds the process group after
    # destroy_process_group; freed only at interpreter shutdown, gloo's threads then abort
    # the process. end_distributed frees it while Python is alive.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        ddp.cycle = [ddp]
        held = weakref.ref(ddp)
        del ddp
        assert held() is not None  # only a collection frees a cycle
        train.end_distributed(finished=True)
        assert held() is None and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_bad_data_file_under_torchrun_is_reported_once(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "c", "target": \n')
    r = run("--standalone", "--nproc_per_node=2", "train.py", f"--data={bad}", f"--out_dir={tmp_path}/o",
            "--max_steps=1", cmd=[sys.executable, "-m", "torch.distributed.run"])
    assert r.returncode != 0
    both = r.stdout + r.stderr
    assert both.count("bad.jsonl:2: not valid JSON") == 1  # rank 0 alone says it
    assert 'train.py", line' not in both  # no stack trace of the script (torchrun adds its summary)


# --- small things ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def addition_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("add")
    r = run("train.py", *TINY, "--max_steps=2", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return f"{out}/ckpt.pt"


def test_stdin_prompts_with_windows_line_ends(addition_checkpoint):
    plain = run("sample.py", f"--ckpt={addition_checkpoint}", "12+34=", "5+6=")
    piped = run("sample.py", f"--ckpt={addition_checkpoint}", stdin="12+34=\r\n\r\n5+6=\r\n")
    assert plain.returncode == piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stdout
    # one line per prompt, then the speed: the same prompts, so the same answers
    # (split at "\n" only: an untrained model's answer may hold bytes such as \x1c that
    # str.splitlines also splits at)
    lines = piped.stdout.split("\n")
    assert lines[:2] == plain.stdout.split("\n")[:2]
    assert lines[0].startswith("12+34=") and lines[1].startswith("5+6=")


def test_an_empty_stdin_that_stays_open_falls_back_to_heldout_examples(addition_checkpoint):
    # a pipe that nothing ever writes to and nobody closes (a job started from a script)
    p = subprocess.Popen([sys.executable, "sample.py", f"--ckpt={addition_checkpoint}", "--num_examples=3"],
                         cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = p.communicate(timeout=300)  # a hang, not a speed limit: never reached
    finally:
        p.kill()
        p.stdin.close()
    assert p.returncode == 0, stderr
    assert "exact match: " in stdout and stdout.count("expected") + stdout.count("   ok") == 3
    assert sample.stdin_prompts(io.StringIO("")) == []


def test_jsonl_lines_end_at_newline_only(tmp_path):
    # U+2028 (line separator) and U+0085 are valid characters inside a JSON string
    pairs = [("a\u2028b", "c\u0085d"), ("e", "f\x1cg")]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\r\n" for s, t in pairs),
                    encoding="utf-8")
    assert data.read_pairs(str(path)) == pairs
    tsv = tmp_path / "p.tsv"
    tsv.write_text("1=\tone\r\n2=\ttwo\u2028three\r\n", encoding="utf-8")
    assert data.read_pairs(str(tsv)) == [("1=", "one"), ("2=", "two\u2028three")]


def test_help_describes_every_flag_with_its_allowed_values():
    for parser in (train.build_parser(), sample.build_parser(), bench.build_parser(), finetune.build_parser()):
        for action in parser._actions:
            if action.dest == "help":
                continue
            text = action.help or ""
            assert text.split("(default")[0].strip(), f"{parser.prog} {action.dest}: no description"
            if action.choices:  # argparse shows {a,b,c} beside the flag
                assert action.metavar is None
    helps = {a.dest: a.help for a in train.build_parser()._actions}
    assert "> 0" in helps["grad_clip"] and "in (0, 1)" in helps["val_fraction"]
    assert ">= 1" in helps["batch_size"] and ">= 1" in helps["max_steps"] and ">= 1" in helps["eval_every"]
    assert "the longest example of the data" in helps["seq_len"]  # not the dataclass's 32
    helps = {a.dest: a.help for a in sample.build_parser()._actions}
    assert ">= 1" in helps["batch_size"] and ">= 1" in helps["num_examples"]
    for parser in (train.build_parser(), sample.build_parser(), bench.build_parser(), finetune.build_parser()):
        assert parser.allow_abbrev is False


def test_bleu_is_smoothed_and_chrf_scores_one_word_answers(addition_checkpoint, tmp_path):
    # exp smoothing: the k-th order with no match counts 1 / (2^k * total_n).
    # "the the the the" vs "the cat": p1 = 1/4 (clipped), p2 = 1/(2*3), p3 = 1/(4*2),
    # p4 = 1/(8*1); hypothesis longer than the reference: no brevity penalty
    assert data.corpus_bleu(["the the the the"], ["the cat"]) == pytest.approx((1 / 4 * 1 / 6 * 1 / 8 * 1 / 8) ** 0.25)
    # one-word answers: no 2-grams anywhere, BLEU undefined (0, as sacreBLEU); chrF by hand:
    # n=1: 11 hyp / 12 ref chars, 11 match; n=2: 8 / 9, 7; n=3: 5 / 6, 4; n=4: 2 / 3, 1;
    # n=5 only in the reference (not counted). P = (1 + 7/8 + 4/5 + 1/2)/4,
    # R = (11/12 + 7/9 + 4/6 + 1/3)/4, chrF = 5PR / (4P + R)
    hyps, refs = ["five", "six", "sevn"], ["five", "six", "seven"]
    P, R = (1 + 7 / 8 + 4 / 5 + 1 / 2) / 4, (11 / 12 + 7 / 9 + 4 / 6 + 1 / 3) / 4
    assert data.corpus_bleu(hyps, refs) == 0.0
    assert data.chrf(hyps, refs) == pytest.approx(5 * P * R / (4 * P + R))
    assert data.chrf(["a b"], ["ab"]) == pytest.approx(1.0)  # whitespace is not a character here
    # sample.py --eval says which BLEU it prints, and prints chrF beside it
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"source": f"{n}+1=", "target": str(n + 1)}) + "\n" for n in range(4)))
    r = run("sample.py", f"--ckpt={addition_checkpoint}", f"--eval={path}")
    assert r.returncode == 0, r.stderr
    assert "BLEU (sacreBLEU's default: corpus, 4-gram, exp smoothing, 13a tokens)" in r.stdout
    assert "chrF" in r.stdout
