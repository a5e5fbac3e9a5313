"""Shared helpers of the tests: the project root on sys.path, tiny models, a small trained
one, a training layout with noise, hand-written masks, and running the scripts as a user does."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One thread per process: the suite shares its machine (other jobs, the DDP test's two
# processes, notebook kernels), and torch's default of one thread per core slows every
# process down several times over when the cores are busy. Subprocesses (the scripts,
# torchrun's workers, notebook kernels) inherit the variables.
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
torch.set_num_threads(1)

import data  # noqa: E402  (after the path is set; data.py imports no model code)

# Nothing here imports e2d2 at the top: with --impl, pytest_configure first puts the
# learner's file in its place, and the helpers below import it when they run.

# the scripts run single-threaded (above) and unbuffered (their output is read as it comes)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
ENV.pop(data.IMPL_ENV, None)  # the scripts run e2d2.py unless --impl says otherwise (below)

# --impl=FILE: the whole suite grades FILE, a learner's copy of e2d2.py (exercises.py), in
# place of e2d2.py. Every module that imported e2d2 is dropped, so that it imports FILE
# instead when a test module imports it (the test modules are collected after
# pytest_configure); the scripts run as subprocesses read FILE from $E2D2_IMPL. After the
# run everything is put back: exercises.py runs several gradings in one process.
PROJECT_MODULES = ("e2d2", "models", "baselines", "train", "sample", "bench")
TESTS = os.path.dirname(os.path.abspath(__file__))


def reads_e2d2(name, module) -> bool:
    """Whether a module in sys.modules may hold names from e2d2: the project's, the test modules."""
    return name in PROJECT_MODULES or (name != "conftest" and
                                       os.path.dirname(getattr(module, "__file__", None) or "") == TESTS)


def pytest_addoption(parser):
    parser.addoption("--impl", default="", metavar="FILE",
                     help="run the tests against FILE (your copy of e2d2.py, see exercises.py) instead of e2d2.py")


def pytest_configure(config):
    impl = config.getoption("impl")
    if not impl:
        return
    swapped = {name: mod for name, mod in sys.modules.items() if reads_e2d2(name, mod)}
    for name in swapped:
        del sys.modules[name]
    config._e2d2_swapped = swapped
    try:
        data.use_impl(impl)
    except ValueError as e:
        raise pytest.UsageError(str(e))
    except Exception as e:  # the file's own mistake, at import time: say where
        raise pytest.UsageError(f"--impl={impl}: importing it raised {type(e).__name__}: {e}") from e
    ENV[data.IMPL_ENV] = os.path.abspath(impl)


def pytest_unconfigure(config):
    swapped = getattr(config, "_e2d2_swapped", None)
    if swapped is None:
        return
    for name, mod in list(sys.modules.items()):  # what this run imported against FILE
        if reads_e2d2(name, mod):
            del sys.modules[name]
    sys.modules.update(swapped)
    ENV.pop(data.IMPL_ENV, None)
# a small model for the scripts' end-to-end tests
SMALL = ["--d_model=32", "--n_enc=2", "--n_dec=1", "--eval_examples=4", "--eval_batches=1"]


@pytest.fixture
def root():
    return ROOT


def run(*args, stdin=None, cmd=None):
    """Run a script of the project (python <args>) in the project root; no time limit,
    so a slow machine never fails a test."""
    return subprocess.run((cmd or [sys.executable]) + list(args), cwd=ROOT, capture_output=True,
                          text=True, input=stdin, env=ENV)


def script_error(main, argv, capsys) -> str:
    """Call a script's main(argv) in this process (no interpreter start-up per case) and
    return what it tells the user when it fails: a script stops on a user's mistake with
    SystemExit (sys.exit("error: ...") or argparse's usage error), never another
    exception, so no stack trace can reach the user."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code not in (0, None)
    return f"{stop.value.code}\n{capsys.readouterr().err}"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small E2D2 trained in-process on 2-digit addition (about 2.5 min on one thread), once
    for the slow checks that need a model that answers. 1500 steps: on this project's
    current CPU machine 1000 steps reached held-out exact match 0.53 (val NELBO 0.30) and
    1500 steps 1.00 (0.037); the margin is for machines whose kernels round differently."""
    import train
    out = tmp_path_factory.mktemp("tiny")
    tc = train.TrainConfig(task="addition", digits=2, out_dir=str(out), batch_size=64,
                           max_steps=1500, lr=2e-3, warmup_steps=30, eval_every=1500,
                           eval_examples=64, eval_batches=2)
    cfg, _, _ = train.setup(tc, dict(d_model=96, n_heads=4, n_enc=4, n_dec=1, block_len=4, seq_len=20), "cpu")
    return train.train(cfg, tc, "cpu")


def tiny(model="e2d2", **kw):
    """A tiny model in float64 (equal math gives equal tokens), eval mode, seed 0."""
    from e2d2 import ModelConfig
    from models import build_model
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(model=model, seq_len=32, block_len=4, d_model=32, n_heads=4,
                                n_enc=3, n_dec=2), **kw})
    return build_model(cfg).double().eval()


def random_layout(model, prompt_lens=(5, 7, 2), n_answer_blocks=3, seed=0):
    """x0 in the training layout (left-padded prompt, answer blocks) and a noisy x_t."""
    import e2d2
    g = torch.Generator().manual_seed(seed)
    B = model.cfg.block_len
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in prompt_lens]
    P = e2d2.left_pad(prompts, B, model.cfg.pad_id)
    ans = torch.randint(0, 200, (len(prompts), n_answer_blocks * B), generator=g)
    x0 = torch.cat([P, ans], 1)
    x_t = x0.clone()
    noisy = torch.rand(ans.shape, generator=g) < 0.5
    x_t[:, P.shape[1]:][noisy] = model.cfg.mask_id
    prompt_mask = torch.zeros_like(x0, dtype=torch.bool)
    prompt_mask[:, :P.shape[1]] = True
    return prompts, x0, x_t, prompt_mask, P.shape[1]


def rows(*lines):
    """A boolean mask written by hand, one string of 0/1 per query ("11 00" = 1100)."""
    return torch.tensor([[int(c) for c in line.replace(" ", "")] for line in lines], dtype=torch.bool)


def log_losses(out_dir):
    """The per-step training losses in out_dir/log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)["model"]


class LayerCounter:
    """Counts Layer calls and the tokens (per sequence) they process."""

    def __init__(self, model):
        from e2d2 import Layer
        self.calls = self.tokens = 0
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules() if isinstance(m, Layer)]

    def hook(self, module, args, out):
        self.calls += 1
        self.tokens += args[0].shape[1]

    def remove(self):
        for h in self.handles:
            h.remove()
