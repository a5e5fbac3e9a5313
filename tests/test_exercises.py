"""exercises.py: every exercise blanks what it names and is graded by its checks; the
classic wrong answers fail with their lesson, correct answers written differently pass;
`pytest --impl=FILE` makes the scripts and the tests use FILE. The gradings run in this
process (exercises.run_checks: pytest.main with --impl), a few seconds each."""
import textwrap

import pytest

import data
import exercises
from conftest import SMALL, run

with open(exercises.SOLUTION) as f:
    SOLUTION = f.read()
N = len(exercises.EXERCISES)


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(source)
    return str(path)


def replace_function(source: str, name: str, code: str) -> str:
    """source with the function `name` ("Class.method" too) replaced by `code`, written at
    column 0 (a method is indented here): how a learner's different answer is made."""
    node = exercises.functions(source)[name]
    lines = source.splitlines(keepends=True)
    start = (node.decorator_list[0] if node.decorator_list else node).lineno - 1
    indent = " " * node.col_offset
    lines[start:node.end_lineno] = [textwrap.indent(textwrap.dedent(code).strip() + "\n", indent)]
    return "".join(lines)


def test_the_table_names_functions_that_e2d2_defines():
    exercises.check_table(SOLUTION)  # a renamed function: a clear error naming the exercise
    with pytest.raises(ValueError, match=r"exercise 4 \(decoder_mask\).*EXERCISES table"):
        exercises.check_table(SOLUTION.replace("def decoder_mask(", "def decoder_mask_renamed("))
    # a blanked copy keeps every signature and docstring, and only those
    copy = exercises.blanked(SOLUTION, [4])
    assert copy.count("raise NotImplementedError(") == 1
    assert "offset block-causal" in copy and "offset_block_causal = " not in copy


@pytest.mark.parametrize("n", range(1, N + 1))
def test_start_n_fails_only_exercise_n_and_the_solution_passes_check_n(n, tmp_path):
    # start N: every check of N fails, each with exercise N's NotImplementedError only
    blank = write(tmp_path, "blank.py", exercises.blanked(SOLUTION, [n]))
    results = exercises.run_checks([n], blank)
    assert results and all(not r.passed for r in results), [r.check for r in results if r.passed]
    assert all(r.error.startswith(f"NotImplementedError: exercise {n}: ") for r in results), \
        [r.error for r in results]
    # the solution of exercises 1..N passes check N, even with every later exercise still blank
    later_blank = write(tmp_path, "later.py", exercises.blanked(SOLUTION, range(n + 1, N + 1)))
    results = exercises.run_checks([n], later_blank)
    assert all(r.passed for r in results), [(r.check, r.error) for r in results if not r.passed]


def test_everything_blanked_fails_every_check_with_a_not_implemented_error(tmp_path):
    # start N --upto: the copy still imports (nothing at import time calls a blanked function);
    # every check fails with the NotImplementedError of its exercise or of one it builds on
    blank = write(tmp_path, "all.py", exercises.blanked(SOLUTION, range(1, N + 1)))
    results = exercises.run_checks(range(1, N + 1), blank)
    for n, ex in enumerate(exercises.EXERCISES, 1):
        for r in (r for r in results if r.check in [c for c, _ in ex.checks]):
            assert not r.passed and r.error.startswith("NotImplementedError: exercise "), (r.check, r.error)
            assert int(r.error.split("exercise ")[1].split(":")[0]) <= n, (r.check, r.error)


# The classic wrong answers, each a learner's function in place of e2d2.py's, and the words
# its check must say. (Written out in full, so they do not depend on e2d2.py's lines.)
WRONG = {
    "decoder mask whose block sees its own clean tokens": (4, "decoder_mask", """
        def decoder_mask(valid, block_len):
            blk = torch.arange(valid.shape[1]) // block_len
            to_clean = (blk[:, None] >= blk[None, :]) & valid[:, None, :] & valid[:, :, None]  # >=: the leak
            to_noisy = padding_sees_itself((blk[:, None] == blk[None, :]) & valid[:, None, :], valid)
            return torch.cat([to_clean, to_noisy], dim=-1)
        """, "see their own clean tokens"),
    "encoder mask that reads the prompt block-causally": (3, "encoder_mask", """
        def encoder_mask(prompt_mask, valid, block_len):
            blk = torch.arange(valid.shape[1]) // block_len
            return padding_sees_itself((blk[:, None] >= blk[None, :]) & valid[:, None, :], valid)
        """, "you read the prompt block-causally"),
    "loss that counts unmasked tokens": (2, "diffusion_loss", """
        def diffusion_loss(logits, x0, noised, target_mask, mask_id, importance=None):
            log_p = masked_log_probs(logits, mask_id)  # no carry-over: unmasked tokens cost nats too
            nll = -log_p.gather(-1, x0[..., None]).squeeze(-1)
            w = loss_weight(noised.alpha_t, noised.alpha_prime_t)
            n_targets = target_mask.sum().clamp(min=1)
            row_nats = torch.where(target_mask, w * nll, 0.0).sum(1)
            return row_nats.sum() / n_targets, torch.where(target_mask, nll, 0.0).sum() / n_targets, n_targets, row_nats
        """, "unmasked tokens add exactly 0"),
    "sampler that re-encodes the noisy block": (7, "CachedE2D2.logits", """
        def logits(self, x_block):
            n, B = self.dec.n, x_block.shape[1]
            self.model.encode(x_block, slice(n, n + B), self.enc.key_mask(B), self.enc.per_layer())  # wasted: never kept
            self.decoder_calls += 1
            return self.model.decode(x_block, slice(n, n + B), self.dec.key_mask(B), self.dec.per_layer())
        """, "the noisy block never goes through the encoder"),
    "sampler that never encodes the finished block": (7, "CachedE2D2.finish_block", """
        def finish_block(self, block):
            pass  # the finished block is dropped
        """, "never ran the encoder"),
}


@pytest.mark.parametrize("wrong", WRONG)
def test_a_classic_wrong_answer_fails_its_check_with_the_lesson(wrong, tmp_path):
    n, name, code, lesson = WRONG[wrong]
    impl = write(tmp_path, "wrong.py", replace_function(SOLUTION, name, code))
    results = exercises.run_checks([n], impl)
    printed = exercises.report([n], impl, results)
    assert any(not r.passed for r in results)
    assert lesson in printed, printed


# Correct answers written otherwise than e2d2.py's: Python loops over every entry.
LOOPS = {
    3: ("encoder_mask", """
        def encoder_mask(prompt_mask, valid, block_len):
            b, L = valid.shape
            mask = torch.zeros(b, L, L, dtype=torch.bool)
            for r in range(b):
                for i in range(L):
                    for j in range(L):
                        if not valid[r, i]:
                            mask[r, i, j] = i == j
                        else:
                            mask[r, i, j] = bool(valid[r, j]) and (j // block_len <= i // block_len
                                                                   or bool(prompt_mask[r, j]))
            return mask
        """),
    4: ("decoder_mask", """
        def decoder_mask(valid, block_len):
            b, L = valid.shape
            mask = torch.zeros(b, L, 2 * L, dtype=torch.bool)
            for r in range(b):
                for i in range(L):
                    for j in range(L):
                        if valid[r, i]:
                            mask[r, i, j] = bool(valid[r, j]) and j // block_len < i // block_len
                            mask[r, i, L + j] = bool(valid[r, j]) and j // block_len == i // block_len
                        else:
                            mask[r, i, L + j] = i == j
            return mask
        """),
}


@pytest.mark.parametrize("n", LOOPS)
def test_a_correct_answer_written_with_loops_passes(n, tmp_path):
    name, code = LOOPS[n]
    impl = write(tmp_path, "loops.py", replace_function(SOLUTION, name, code))
    results = exercises.run_checks([n], impl)
    assert all(r.passed for r in results), exercises.report([n], impl, results)


def test_the_command_line(tmp_path, capsys):
    out = str(tmp_path / "mine.py")
    assert exercises.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert [line.split(".")[0] for line in listed.splitlines()] == [str(n) for n in range(1, N + 1)]  # one line each
    assert "3. the encoder mask: encoder_mask" in listed
    assert exercises.main(["start", "2", "--upto", f"--out={out}"]) == 0
    assert open(out).read().count("raise NotImplementedError(") == 3 + 4  # exercise 1's functions and 2's
    assert exercises.main(["start", "3", f"--out={out}"]) == 2  # a learner's file is never overwritten ...
    assert "exists (your work?): pass --force" in capsys.readouterr().err
    assert exercises.main(["start", "3", f"--out={out}", "--force"]) == 0  # ... unless asked to
    assert exercises.main(["check", "3", f"--impl={out}"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert exercises.main(["check", "3", f"--impl={exercises.SOLUTION}"]) == 0
    assert "4 of 4 checks pass" in capsys.readouterr().out
    assert exercises.main(["check", str(N + 1), f"--impl={out}"]) == 2
    assert f"there is no exercise {N + 1}" in capsys.readouterr().err
    assert exercises.main(["check", "3", f"--impl={tmp_path / 'none.py'}"]) == 2
    assert "run `python exercises.py start 3` first" in capsys.readouterr().err


def test_train_py_runs_the_file_given_by_impl(tmp_path):
    # python train.py --impl=FILE trains and samples (its evaluation) with FILE; a wrong path
    # is one clear line (data.use_impl's error, which train.py and sample.py print)
    impl = write(tmp_path, "mine.py", SOLUTION + '\nprint("(my e2d2.py)")\n')
    r = run("train.py", f"--impl={impl}", *SMALL, "--max_steps=1", "--eval_every=1", "--batch_size=4",
            f"--out_dir={tmp_path / 'run'}", "--threads=1")
    assert r.returncode == 0 and r.stdout.startswith("(my e2d2.py)"), r.stderr
    with pytest.raises(ValueError, match="--impl=nothing.py: not a Python file"):
        data.use_impl("nothing.py")
