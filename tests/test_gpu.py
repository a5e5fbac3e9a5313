"""The GPU path, end to end, in one command:

    python -m pytest -q -m gpu -rs

Every test here is marked `gpu` and left out of the default run (pytest.ini). Without a CUDA
device each is skipped, and -rs prints why; with one (a few minutes on one GPU) they check:
  - train.py trains the default task on cuda in bf16 to held-out exact match >= 0.95, and
    prints training tokens/s, the model's TFLOP/s and MFU;
  - on cuda in float32, the cached sampler gives the uncached sampler's tokens, and the
    compiled sampler (models.compile_for_sampling) gives eager's;
  - train.py --compile trains on cuda;
  - a 1-process run under torchrun, on NCCL;
  - the training and sampling benchmarks of bench.py on cuda, their figures printed (every
    timing waits for the GPU before and after: models.timed).
The figures are printed even though pytest captures output (capsys.disabled)."""
import re
import sys

import pytest
import torch

import bench
import data
from conftest import log_losses, run
from e2d2 import generate
from models import autocast_for, build_model, compile_for_sampling, load_checkpoint, model_from_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device: torch.cuda.is_available() is False")]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """python train.py on the GPU in bf16: the default task (3-digit addition) and model
    (2000 steps of batch 128), evaluated at steps 1000 and 2000."""
    out = tmp_path_factory.mktemp("gpu")
    r = run("train.py", "--device=cuda", "--dtype=bfloat16", "--eval_every=1000", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


@pytest.fixture(scope="module")
def heldout():
    """256 held-out sums of the default task, as (prompt ids, answer)."""
    tok = data.ByteTokenizer()
    return [(tok.encode(p), a) for p, a in data.task_examples(data.get_task("addition"), "val", 256, seed=3)]


def exact_match(out, examples) -> float:
    tok = data.ByteTokenizer()
    return sum(tok.decode(ids) == a for ids, (_, a) in zip(out.tokens, examples)) / len(examples)


def test_bf16_training_on_cuda_learns_the_default_task(cuda_run, capsys):
    _, stdout = cuda_run
    with capsys.disabled():
        print("\n" + stdout)
    final = stdout.strip().splitlines()[-1]
    assert float(re.search(r"exact_match=([\d.]+)$", final).group(1)) >= 0.95, final
    assert "device=cuda, processes=1" in stdout and "MFU" in stdout
    evals = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(evals) == 2 and all(re.search(r"training \d+ tokens/s, [\d.e+-]+ model TFLOP/s", e) for e in evals)


def test_cached_equals_uncached_and_compiled_equals_eager_on_cuda(cuda_run, heldout):
    # float32 on the GPU: a trained model's tokens do not hang on a near tie, so the cached
    # sampler (B queries against the caches) must give the uncached one's (the whole
    # sequence again), and the compiled layer stacks (fused kernels) eager's
    out_dir, _ = cuda_run
    model = model_from_checkpoint(load_checkpoint(str(out_dir / "ckpt.pt"), "cuda"), "cuda")
    prompts = [p for p, _ in heldout]
    cached = generate(model, prompts, use_cache=True)
    assert generate(model, prompts, use_cache=False).tokens == cached.tokens
    assert exact_match(cached, heldout) >= 0.95
    compiled = build_model(model.cfg).to("cuda")
    compiled.load_state_dict(model.state_dict())
    compile_for_sampling(compiled)
    for batch in (prompts, prompts[:7]):  # a second batch size: a second compiled shape
        assert generate(compiled, batch).tokens == generate(model, batch).tokens
    with autocast_for("cuda"):  # and in bf16 (tokens may part at a tie; the answers stay right)
        for use_cache in (True, False):
            assert exact_match(generate(model, prompts, use_cache=use_cache), heldout) >= 0.95


def test_compiled_training_on_cuda(tmp_path):
    # train.py --compile: the training forward and backward compiled (on a GPU: fused Triton
    # kernels); 100 steps, the loss falls as it does in eager
    r = run("train.py", "--device=cuda", "--compile", "--max_steps=100", "--warmup_steps=10", "--eval_every=100",
            "--eval_examples=16", "--eval_batches=1", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    losses = log_losses(tmp_path)
    assert len(losses) == 100 and sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_torchrun_one_process_on_nccl(tmp_path):
    r = run("--standalone", "--nproc_per_node=1", "train.py", "--device=cuda", "--max_steps=20", "--eval_every=20",
            "--eval_examples=16", "--eval_batches=1", f"--out_dir={tmp_path}",
            cmd=[sys.executable, "-m", "torch.distributed.run"])
    assert r.returncode == 0, r.stderr
    assert "device=cuda:0, processes=1 (nccl)" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("final step=20 ")


def test_training_and_sampling_benchmarks_on_cuda(capsys):
    with capsys.disabled():  # their tables, as `python bench.py train` and `sample` print them
        print()
        rows = bench.bench_training(8, 5, "cuda")
        samples = bench.bench_sampling([1, 8], 3, "cuda")
    assert all(r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in samples)
