"""
Build E2D2 yourself: exercises graded by the project's own tests.

    python exercises.py list                      # the exercises, in the order of the paper and of e2d2.py
    python exercises.py start 3                   # my_e2d2.py: e2d2.py with exercise 3's functions blanked
    python exercises.py start 8 --upto            # ... with exercises 1 to 8 blanked: build all of E2D2 in order
    python exercises.py check 3                   # grade exercise 3 in my_e2d2.py (exit 0 = every check passes)
    python train.py --impl=my_e2d2.py             # train and sample with your E2D2
    python -m pytest -q --impl=my_e2d2.py         # the whole test suite against your file

`start` parses e2d2.py and replaces the body of each function an exercise asks for by
`raise NotImplementedError("exercise N: ...")`, keeping its signature, decorators and
docstring (the docstring says what to write). The solution exists once, in e2d2.py.

`check` runs the tests that grade the exercise (the project's own tests, and those of
tests/test_grading.py, written to teach: their messages say which rule of the paper an
answer breaks) with `pytest --impl=FILE`, which makes every module that imports e2d2
(models.py, baselines.py, the scripts, the tests) import FILE instead. It prints each
check, PASS or FAIL, and for a failure what went wrong and a hint.

A check of exercise N uses only exercises 1..N: after `start 8 --upto` you can write
exercise 1, check it, then 2, and so on. A check that hits an exercise you have not
written yet says so (its NotImplementedError).
"""

import argparse
import ast
import contextlib
import io
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.abspath(__file__))
SOLUTION = os.path.join(ROOT, "e2d2.py")


@dataclass
class Exercise:
    title: str  # what it is called, in the paper's words
    names: tuple  # what it asks for: functions and methods of e2d2.py ("Class.method")
    teaches: str  # one line: what writing it teaches
    checks: tuple  # (pytest node id, hint): the tests that grade it; a node id without [params] runs them all


# THE table: exercise N is EXERCISES[N - 1]. When a function of e2d2.py is renamed or moved,
# fix its name here (a test of the default suite fails while a name is missing from e2d2.py).
EXERCISES = [
    Exercise("the noise schedule and q(x_t | x_0)", ("noise_schedule", "sample_t", "q_sample"),
             "alpha(t) and alpha'(t); one t per block; each target token masked with probability 1 - alpha(t_k); "
             "prompts never masked; no block left without a [MASK]", (
                 ("tests/test_math.py::test_schedule_pair_order_and_derivative",
                  "noise_schedule returns the pair (alpha(t), alpha'(t)) in that order: alpha falls from ~1 (clean) "
                  "at t = 0 to ~0 (all [MASK]) at t = 1; alpha' is its derivative, negative"),
                 ("tests/test_math.py::test_sample_t_range", "ONE t per block, not per sequence: t_k ~ U[t_min, "
                  "t_max], shape (b, K), float64"),
                 ("tests/test_math.py::test_forward_process_masking_rate_is_one_minus_alpha",
                  "each target token of block k becomes [MASK] independently with probability 1 - alpha(t_k), with "
                  "ITS block's t_k (alpha_t is block k's value repeated on its B tokens)"),
                 ("tests/test_math.py::test_forward_process_never_masks_prompt_and_fills_every_block",
                  "only target tokens are masked (prompt and padding never); with ensure_masked a block that has "
                  "targets but drew no [MASK] gets m ~ U{1..n_targets} of them masked: a block with nothing to "
                  "predict teaches nothing"))),
    Exercise("SUBS and the loss", ("masked_log_probs", "subs_log_probs", "loss_weight", "diffusion_loss"),
             "zero mass on [MASK], carry-over of unmasked tokens, the NELBO weight -alpha'/(1 - alpha), the "
             "average over target tokens", (
                 ("tests/test_math.py::test_subs_zero_mask_mass_and_carry_over",
                  "SUBS: (a) logits[MASK] = -inf before the softmax (clean data never holds [MASK]); (b) where x_t is "
                  "not [MASK], p(x_0 = x_t) = 1 exactly (log p = 0 on x_t, -inf elsewhere)"),
                 ("tests/test_math.py::test_known_values", "loss_weight(alpha_t, alpha'_t) = -alpha'(t) / (1 - "
                  "alpha(t)): with the linear schedule (alpha = 1 - t) it is 1/t, 4 at t = 0.25"),
                 ("tests/test_math.py::test_loss_counts_only_masked_targets_with_nelbo_weights",
                  "nelbo = sum over masked targets of w_k * -log p(x0_i | x_t), w_k = -alpha'(t_k) / (1 - alpha(t_k)) "
                  "(linear: 1/t), divided by the number of TARGET tokens; masked_ce: the same without w_k"),
                 ("tests/test_grading.py::test_loss_ignores_unmasked_tokens", ""))),
    Exercise("the encoder mask", ("encoder_mask",),
             "block-causal attention over the clean x_0, the prompt read bidirectionally, padding never seen", (
                 ("tests/test_masks.py::test_encoder_mask_no_prompt_is_block_causal",
                  "without a prompt, query i sees key j iff block(j) <= block(i): block-causal"),
                 ("tests/test_masks.py::test_encoder_mask_prompt_is_bidirectional",
                  "every query sees every prompt token, even one in a later block: the prompt is read whole"),
                 ("tests/test_masks.py::test_encoder_mask_padding_never_seen",
                  "no query sees a padding key; a padding query sees itself only (padding_sees_itself)"),
                 ("tests/test_grading.py::test_encoder_mask_follows_the_rules", ""))),
    Exercise("the decoder mask", ("decoder_mask",),
             "the noisy block k sees clean h of the blocks before k and its own noisy block: (b, L, 2L)", (
                 ("tests/test_masks.py::test_decoder_mask_offset_block_causal_and_block_diagonal",
                  "keys are [h ; x_t] (2L): clean h_j iff block(j) < block(i) (offset block-causal), noisy x_t,j iff "
                  "block(j) == block(i) (block-diagonal)"),
                 ("tests/test_masks.py::test_decoder_mask_with_padding",
                  "no padding key is seen; a padding query sees only its own noisy key"),
                 ("tests/test_grading.py::test_decoder_mask_follows_the_rules", ""))),
    Exercise("the E2D2 network's training forward",
             ("E2D2Network.encode", "E2D2Network.decode", "E2D2Network.logits", "diffusion_forward"),
             "the encoder over x_0 (encoder_mask), the decoder over x_t against [h ; x_t] (decoder_mask), all blocks "
             "in one pass; the training step: t per block, q(x_t | x_0), the loss", (
                 ("tests/test_grading.py::test_training_forward_sees_what_the_masks_allow", ""),
                 ("tests/test_model.py::test_logits_of_block_k_ignore_every_later_block",
                  "block k's logits must not change when any LATER block changes, clean or noisy: build the two "
                  "masks with encoder_mask and decoder_mask and pass them to the layers"),
                 ("tests/test_grading.py::test_training_step_averages_over_targets", ""),
                 ("tests/test_model.py::test_loss_backward_and_every_block_is_trained",
                  "model(x0, prompt_mask) returns a Loss whose n_targets counts every non-prompt, non-padding token; "
                  "its loss must reach every parameter (the shared embedding, both stacks)"),
                 ("tests/test_model.py::test_shared_kv_decoder_reads_the_top_encoder_layers",
                  "encode returns h = enc_norm(last hidden state) AND every encoder layer's keys/values (what "
                  "clean_kv hands the shared_kv decoder); decode runs the decoder layers against clean_kv"))),
    Exercise("one denoising step", ("denoise_step", "most_confident", "remask", "margin", "ancestral"),
             "x_theta from SUBS probabilities; predict and remask (keep the most confident), or q(x_s | x_t, "
             "x_theta); revealed tokens never change", (
                 ("tests/test_grading.py::test_remask_reveals_the_most_confident", ""),
                 ("tests/test_denoise.py::test_ancestral_reveal_probability",
                  "ancestral: each [MASK] is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), "
                  "independently; a decoded token never changes; at temperature 0 a revealed token is the argmax of "
                  "p_theta (never [MASK])"),
                 ("tests/test_denoise.py::test_confidence_threshold_reveals_at_least_what_the_schedule_reveals",
                  "the threshold only ADDS reveals: every [MASK] whose x_theta is more likely than it, on top of "
                  "what the strategy reveals"),
                 ("tests/test_denoise.py::test_margin_reveals_the_widest_gap_where_remask_reveals_the_likeliest_token",
                  "margin ranks the [MASK] positions by p1 - p2, the gap between their two likeliest tokens, and "
                  "reveals the widest gaps on the same schedule as remask (most_confident)"),
                 ("tests/test_denoise.py::test_temperature_sampling_draws_from_softmax_of_logits_over_temperature[2.0]",
                  "temperature > 0: x_theta ~ softmax(logits / temperature) (SUBS: never [MASK]); 0: the argmax"))),
    Exercise("the cached sampler", ("CachedE2D2.__init__", "CachedE2D2.encode", "CachedE2D2.logits",
                                    "CachedE2D2.finish_block"),
             "what is cached (every clean token's keys/values, in the encoder and in each decoder layer) and when "
             "the encoder runs (the prompt once, each finished block once; a noisy block never)", (
                 ("tests/test_grading.py::test_cached_sampler_encodes_each_clean_token_once", ""),
                 ("tests/test_model.py::test_train_and_inference_logits_agree_block_by_block",
                  "the cached decoder's logits of block k must equal the training forward's: its queries see the "
                  "cached clean keys of the prompt and blocks < k, and the block's own noisy keys; RoPE positions "
                  "continue from the cache length; encoder_calls = 1 (prompt) + 1 per finished block (but the last)"),
                 ("tests/test_model.py::test_text_model_reads_a_prompt_block_causally_as_trained",
                  "the prompt is encoded as training read it: bidirectionally for seq2seq, block-causally for text "
                  "(read_bidirectionally and encoder_mask)"))),
    Exercise("the block loop", ("generate",),
             "blocks left to right, T denoising steps each on the time grid 1 -> 0, each finished block joining the context (finish_block), "
             "a row stopped at [EOS]", (
                 ("tests/test_model.py::test_remask_reveals_on_schedule",
                  "T steps per block on the grid t_i = 1 - i/T: step i goes from alpha(t_i) to alpha(t_(i+1)), the "
                  "last step reveals every [MASK] left (final=True)"),
                 ("tests/test_denoise.py::test_remask_count_follows_a_non_linear_schedule",
                  "alpha on the time grid comes from the model's schedule (noise_schedule(cfg.schedule, ...)), not "
                  "from 1 - t"),
                 ("tests/test_model.py::test_skip_network_call_when_block_did_not_change",
                  "a step that starts from the same block as the last call reuses its logits: the network runs "
                  "only when x changed"),
                 ("tests/test_model.py::test_cached_sampling_equals_uncached[remask-0.0-0.05-hidden]",
                  "the cached and the uncached runner must give the same tokens: ask the model for its runner "
                  "(make_runner), runner.finish_block on each finished block but the last"),
                 ("tests/test_model.py::test_cached_sampling_equals_uncached[ancestral-1.0-None-hidden]",
                  "pass the generator to every draw, in the same order with and without the cache"),
                 ("tests/test_model.py::test_batched_sampling_equals_one_by_one",
                  "prompts of any lengths are left-padded to a block boundary (left_pad): a row's answer must not "
                  "depend on the other rows of the batch"),
                 ("tests/test_model.py::test_per_sequence_eos_stop",
                  "after a block in which a row wrote [EOS], that row stops: runner.select(rows still going)"))),
]


# --- e2d2.py as a tree: where each function of the table is -------------------------------

def functions(source: str) -> dict:
    """Every function and method of a module's source, by qualified name ("Class.method") -> its ast node."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return out


def exercise(n: int) -> Exercise:
    if not 1 <= n <= len(EXERCISES):
        raise ValueError(f"there is no exercise {n}: they are numbered 1 to {len(EXERCISES)} "
                         f"(python exercises.py list)")
    return EXERCISES[n - 1]


def check_table(source: str, where: str = "e2d2.py") -> None:
    """Every name of the table must be a function of the source (a renamed one: fix its name in the table)."""
    have = functions(source)
    missing = [f"exercise {n} ({name})" for n, ex in enumerate(EXERCISES, 1) for name in ex.names if name not in have]
    if missing:
        raise ValueError(f"{where} has no function for {', '.join(missing)}: was it renamed? Fix its name in "
                         f"exercises.py's EXERCISES table")


def blanked(source: str, numbers) -> str:
    """The source with the body of every function of the exercises `numbers` replaced by
    `raise NotImplementedError("exercise N: ...")`, its signature, decorators and docstring kept."""
    check_table(source)
    have, lines = functions(source), source.splitlines(keepends=True)
    spans = []
    for n in numbers:
        for name in exercise(n).names:
            node = have[name]
            body = node.body
            has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str)
            start = body[0].end_lineno if has_doc else node.body[0].lineno - 1  # 0-based first line to replace
            if not has_doc and body[0].lineno == node.lineno:
                raise ValueError(f"{name}: a one-line function cannot be blanked; write its body on its own lines")
            indent = " " * body[0].col_offset
            what = f"exercise {n}: write {name} ({exercise(n).title}; its docstring says what it returns)"
            spans.append((start, node.end_lineno, f"{indent}raise NotImplementedError({what!r})\n"))
    for start, end, text in sorted(spans, reverse=True):  # from the bottom up: line numbers stay right
        lines[start:end] = [text]
    return "".join(lines)


# --- grading: pytest --impl=FILE on the exercise's checks, in this process -----------------

@dataclass
class Result:
    check: str  # the node id of the table
    hint: str
    passed: bool
    error: str  # what the first failing test said (its exception's message), '' if it passed


class Collector:
    """A pytest plugin that keeps every test's outcome and the message of its failure."""

    def __init__(self):
        self.outcomes, self.errors = {}, []

    def pytest_runtest_logreport(self, report):
        if report.failed or report.when == "call":
            msg = report.longrepr.reprcrash.message if report.failed and hasattr(report.longrepr, "reprcrash") \
                else str(report.longrepr or "")
            self.outcomes.setdefault(report.nodeid, (report.passed, msg))
            if report.failed:  # a failure in setup or teardown wins over the call's pass
                self.outcomes[report.nodeid] = (False, msg)

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors.append(str(report.longrepr))


def first_lines(message: str) -> str:
    """What a failure said: its first lines (a grading test's message is the lesson; a bare
    `assert` of the project's tests says only AssertionError, and the hint speaks for it)."""
    return "\n".join(message.strip().splitlines()[:4])[:600]


def run_checks(numbers, impl: str, verbose: bool = False) -> list:
    """Grade the exercises `numbers` in the file impl: pytest --impl=impl on their checks. Returns
    one Result per check of the table. pytest's own output is kept back unless verbose."""
    import pytest  # here: `list` and `start` need no pytest
    with open(impl) as f:
        source = f.read()
    compile(source, impl, "exec")  # a SyntaxError names your file and line, before pytest starts
    checks = [c for n in numbers for c in exercise(n).checks]
    mine = functions(source)
    missing = [name for n in numbers for name in exercise(n).names if name not in mine]
    if missing:
        raise ValueError(f"{impl} has no {', '.join(missing)}: keep the names of e2d2.py")
    collector = Collector()
    # in-process (several gradings in one process cost ~1 s each, not an interpreter start-up):
    # no cache, no gc.collect() after every test (unraisableexception), no assertion rewriting
    # (the lessons are the tests' messages)
    args = [os.path.join(ROOT, c) for c, _ in checks] + [
        f"--impl={os.path.abspath(impl)}", f"--rootdir={ROOT}", "-c", os.path.join(ROOT, "pytest.ini"),
        "-p", "no:cacheprovider", "-p", "no:unraisableexception", "--assert=plain", "-q",
        "--tb=short" if verbose else "--tb=no"]
    out = io.StringIO()
    with contextlib.redirect_stdout(sys.stdout if verbose else out):
        code = pytest.main(args, plugins=[collector])
    if collector.errors or code not in (0, 1):  # not a failing test: pytest could not run them
        raise RuntimeError(f"pytest could not run the checks of {impl} (exit code {code}):\n"
                           + "\n".join(collector.errors) + out.getvalue()[-3000:])
    results = []
    for check, hint in checks:
        mine = [(ok, msg) for nodeid, (ok, msg) in collector.outcomes.items()
                if nodeid == check or nodeid.startswith(check + "[")]
        if not mine:
            raise RuntimeError(f"no test ran for {check}: was it renamed? Fix it in exercises.py's EXERCISES table")
        failed = [msg for ok, msg in mine if not ok]
        results.append(Result(check, hint, not failed, first_lines(failed[0]) if failed else ""))
    return results


def report(numbers, impl: str, results: list) -> str:
    """What `check` prints: per check PASS or FAIL, and for a failure what it said and the hint."""
    out = []
    for n in numbers:
        ex = exercise(n)
        out.append(f"exercise {n}, {ex.title} ({', '.join(ex.names)}), in {impl}:")
        for r in (r for r in results if r.check in [c for c, _ in ex.checks]):
            out.append(f"  {'PASS' if r.passed else 'FAIL'}  {r.check.replace('tests/', '')}")
            if not r.passed:
                if "NotImplementedError" in r.error:
                    out.append("        not written yet: " + r.error.splitlines()[0])
                elif r.error.strip() != "AssertionError":  # (a bare assert: the hint speaks for it)
                    out.extend("        " + ln for ln in r.error.splitlines())
                if r.hint:
                    out.append("        hint: " + r.hint)
    passed = sum(r.passed for r in results)
    out.append(f"{passed} of {len(results)} checks pass" + (": well done." if passed == len(results) else "."))
    return "\n".join(out)


# --- the command line ------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the exercises, one line each")
    s = sub.add_parser("start", help="write a copy of e2d2.py with exercise N's functions blanked")
    s.add_argument("n", type=int)
    s.add_argument("--upto", action="store_true", help="blank exercises 1 to N")
    s.add_argument("--out", default="my_e2d2.py", help="the file to write (default my_e2d2.py)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists (your work in it is lost)")
    c = sub.add_parser("check", help="grade exercise N (0 = all of them) in your file; exit 0 iff every check passes")
    c.add_argument("n", type=int)
    c.add_argument("--impl", default="my_e2d2.py", help="your copy of e2d2.py (default my_e2d2.py; e2d2.py "
                   "grades the reference itself)")
    c.add_argument("-v", "--verbose", action="store_true", help="also show pytest's own output")
    args = p.parse_args(argv)
    try:
        with open(SOLUTION) as f:
            source = f.read()
        check_table(source)
        if args.command == "list":
            for n, ex in enumerate(EXERCISES, 1):
                print(f"{n}. {ex.title}: {', '.join(ex.names)}. Teaches: {ex.teaches}")
            return 0
        numbers = range(1, len(EXERCISES) + 1) if args.command == "check" and args.n == 0 else \
            range(1, args.n + 1) if getattr(args, "upto", False) else [args.n]
        for n in numbers:
            exercise(n)  # a clear error for a number out of range
        if args.command == "start":
            if os.path.exists(args.out) and not args.force:
                raise ValueError(f"{args.out} exists (your work?): pass --force to replace it, or --out=another.py")
            with open(args.out, "w") as f:
                f.write(blanked(source, numbers))
            impl = f" --impl={args.out}" if args.out != "my_e2d2.py" else ""
            print(f"wrote {args.out}: e2d2.py with {', '.join(n for k in numbers for n in exercise(k).names)} to "
                  f"write.\nThen: python exercises.py check {numbers[0]}{impl}"
                  + (f" (then {numbers[1]}, ... {numbers[-1]}, in order)" if len(numbers) > 1 else ""))
            return 0
        if not os.path.isfile(args.impl):
            raise ValueError(f"no file {args.impl}: run `python exercises.py start {args.n}` first (it writes "
                             f"my_e2d2.py), or pass --impl=FILE")
        results = run_checks(numbers, args.impl, args.verbose)
        print(report(numbers, args.impl, results))
        return 0 if all(r.passed for r in results) else 1
    except (ValueError, SyntaxError, RuntimeError) as e:  # RuntimeError: pytest could not run the checks
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
