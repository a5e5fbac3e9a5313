"""
Sample from a trained checkpoint (E2D2 or a baseline).

    python sample.py "123+456=" "905+777="     # prompts on the command line
    echo "123+456=" | python sample.py          # or one prompt per line on stdin
    python sample.py                            # or held-out examples of the trained task
    python sample.py --show "123+456="          # watch every block being denoised
    python sample.py --eval test.jsonl          # exact match, BLEU (sacreBLEU's 13a), chrF, ROUGE-L
    python sample.py --eval test.txt            # NELBO per byte, bits per byte, perplexity bound
    python sample.py --race=race.html --ckpt=out-e2d2/ckpt.pt --ckpt=out-bd3lm/ckpt.pt   # the race page

Prints one answer per prompt, then the speed: generated tokens/s and the number of
network calls (denoising steps that ran the decoder) and encoder calls. The speed of
every model side by side is measured by bench.py; --race records several checkpoints
answering the same prompts, every network call timed, and writes a web page that replays
them side by side (race.py).
"""

import argparse
import os
import select
import shlex
import sys
import time

import torch

import data

# --impl=FILE (or $E2D2_IMPL): sample with your copy of e2d2.py (exercises.py), as train.py does
if __name__ == "__main__" and data.impl_path(sys.argv[1:]):
    try:
        data.use_impl(data.impl_path(sys.argv[1:]))
    except ValueError as e:
        sys.exit(f"error: {e}")

import race  # (after --impl: it imports e2d2)
from e2d2 import STRATEGIES, generate
from models import (DTYPES, MODEL_TYPES, answer_pairs, autocast_for, compile_for_sampling, eval_nelbo, is_cuda,
                    load_checkpoint, model_from_checkpoint, pick_device)


def heldout_examples(ckpt: dict, n: int, seed: int) -> list:
    """n (prompt, answer) strings held out from what the checkpoint was trained on: the
    dataset is rebuilt from the training settings saved in the checkpoint."""
    if "train_config" not in ckpt:
        raise ValueError("the checkpoint has no training settings: give a prompt")
    cfg = ckpt["config"]
    tok = data.tokenizer_from_dict(ckpt.get("tokenizer"))  # the one the model was trained with
    dataset, _ = data.load_dataset(ckpt["train_config"], cfg["block_len"], cfg["seq_len"], tok)
    if dataset.kind == "text":
        raise ValueError(f"the model was trained on plain text ({ckpt['train_config']['data']}): give a prompt")
    return [(tok.decode(p), tok.decode(a)) for p, a in dataset.val_examples(n, seed)]


class ShowSteps:
    """on_step callback for --show: prints each sequence's answer after every step, with
    [MASK] as '_' (earlier blocks are final; the current block is being denoised)."""

    def __init__(self, tok, prompts):
        self.tok, self.prompts = tok, prompts
        self.done = [[] for _ in prompts]  # finished blocks of each sequence
        self.current = [None] * len(prompts)  # (block index, tokens) being denoised

    def __call__(self, block, step, rows, x):
        # rows: which sequences of the batch are still generating (finished ones have left);
        # x: their current block (len(rows), B)
        for row, tokens in zip(rows.tolist(), x.tolist()):
            if self.current[row] is not None and self.current[row][0] != block:
                self.done[row] += self.current[row][1]
            self.current[row] = (block, tokens)
            text = self.tok.decode(self.done[row], eos_char="$")
            now = self.tok.decode(tokens, mask_char="_", eos_char="$")
            print(f"  [{row}] block {block} step {step + 1}: {self.prompts[row]}{text}|{now}|")


def build_parser() -> argparse.ArgumentParser:
    """The flags, each with what it does and its allowed values; prefixes of flags are
    not accepted (--num_example is an error, not --num_examples)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("prompts", nargs="*", help="prompts (default: stdin if it holds any, else held-out examples)")
    p.add_argument("--ckpt", action="append", default=None,
                   help="checkpoint path (default out/ckpt.pt); with --race, one per lane: give the flag again")
    p.add_argument("--race", default="", help="write the race page to this HTML file: every --ckpt answers the "
                   "same prompts, each network call timed, replayed side by side (race.py)")
    p.add_argument("--repeats", type=int, default=5,
                   help="--race: recorded generations per model, the median one shown, >= 1 (default 5)")
    p.add_argument("--model", default="", choices=["", *MODEL_TYPES],
                   help="fail unless the checkpoint holds this model type (default: any)")
    p.add_argument("--eval", default="", help=f"evaluate on a data file: {'/'.join(data.PAIR_FORMATS)} pairs "
                   "(exact match, BLEU, chrF, ROUGE-L) or plain text (NELBO and perplexity bound)")
    p.add_argument("--batch_size", type=int, default=64, help="--eval: sequences per batch, >= 1 (default 64)")
    p.add_argument("--eval_draws", type=int, default=4,
                   help="--eval on text: draws of (t, x_t) per window for the NELBO estimate, >= 1 (default 4)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps per block, >= 1 (default block_len)")
    p.add_argument("--strategy", choices=tuple(STRATEGIES), default="remask",
                   help="predict and remask the least confident, or ancestral posterior sampling (default remask)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, >= 0; 0 = greedy (default 0)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling (with --temperature > 0): draw only from the most likely tokens "
                   "whose probabilities add up to top_p, in (0, 1] (default 1: all tokens)")
    p.add_argument("--threshold", type=float, default=None,
                   help="also reveal every [MASK] whose confidence exceeds this, in (0, 1] (default off)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=">= 1, at most what seq_len leaves after the prompt (default: all of it)")
    p.add_argument("--no_cache", action="store_true", help="re-run encoder+decoder over everything each step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the layer stacks first (see models.compile_for_sampling): faster steps "
                        "after a compilation of tens of seconds on a CPU; the speed printed leaves it out")
    p.add_argument("--show", action="store_true", help="print every denoising step")
    p.add_argument("--num_examples", type=int, default=8,
                   help="held-out examples when no prompt is given, >= 1 (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of the held-out examples (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="precision: bf16 autocast on CUDA and float32 on the CPU (auto), or float32, or bfloat16 "
                        "(default auto)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch, >= 0; 0 = torch's default, 1 on a busy or shared machine (default 0)")
    p.add_argument("--impl", default=None, metavar="FILE",
                   help="sample with FILE, your copy of e2d2.py (exercises.py), in place of e2d2.py (default: e2d2.py)")
    return p


def check_args(args) -> None:
    """Refuse, before the checkpoint is even read, values that would crash later or
    quietly do nothing (--num_examples=0 answered no prompt at all)."""
    rules = [("batch_size", args.batch_size >= 1, ">= 1"), ("eval_draws", args.eval_draws >= 1, ">= 1"),
             ("num_examples", args.num_examples >= 1, ">= 1"), ("threads", args.threads >= 0, ">= 0"),
             ("repeats", args.repeats >= 1, ">= 1"),
             ("steps", args.steps is None or args.steps >= 1, ">= 1"),
             ("temperature", args.temperature >= 0, ">= 0 (0 = greedy)"),
             ("top_p", 0 < args.top_p <= 1, "in (0, 1] (1 = every token)"),
             ("threshold", args.threshold is None or 0 < args.threshold <= 1, "in (0, 1]")]
    bad = [f"--{name}={getattr(args, name)} must be {rule}" for name, ok, rule in rules if not ok]
    if args.compile and args.eval:  # compilation is applied only where prompts are answered
        bad.append("--compile speeds up answering prompts; leave it out with --eval")
    if len(args.ckpt or []) > 1 and not args.race:
        bad.append(f"{len(args.ckpt)} checkpoints given: several --ckpt are for --race (one lane each)")
    if args.race and (args.eval or args.show):
        bad.append("--race answers prompts and writes a page; leave out --eval and --show")
    if bad:
        raise ValueError("; ".join(bad))


def main(argv=None):
    args = build_parser().parse_args(argv)
    command = "python sample.py " + shlex.join(sys.argv[1:] if argv is None else argv)  # for the race's caption
    args.ckpt = args.ckpt or ["out/ckpt.pt"]
    if args.impl is not None and sys.modules["e2d2"].__file__ != os.path.abspath(args.impl):  # loaded at the top
        sys.exit(f"error: --impl={args.impl} works on the command line only (python sample.py --impl=...)")
    try:  # every mistake a user can make ends in one line "error: ...", never a stack trace
        check_args(args)
        if args.threads:  # torch's default (every core) crawls when other processes are busy
            torch.set_num_threads(args.threads)
        device = pick_device(args.device)
        with autocast_for(device, args.dtype):  # every model call below runs in this precision
            race_page(args, device, command) if args.race else run(args, device)
    except ValueError as e:
        sys.exit(f"error: {e}")


def stdin_prompts(stream=None, wait: float = 1.0) -> list:
    """The prompts piped in on stdin, one per line: Windows line ends (\\r\\n) lose their
    \\r (it would be a prompt character), blank lines are dropped. A terminal is never
    read (the user meant held-out examples), and neither is a stdin that stays empty: a
    pipe that nothing writes to (a job started from a script, a CI step) would otherwise
    block forever. So wait up to `wait` seconds for the first byte; if none comes, there
    are no prompts. Once something arrives, everything up to the end of input is read."""
    stream = stream or sys.stdin
    if stream is None or stream.isatty():
        return []
    try:
        ready, _, _ = select.select([stream], [], [], wait)
    except (OSError, ValueError):  # no file descriptor (an io.StringIO): read it as it is
        ready = [stream]
    try:
        text = stream.read() if ready else ""
    except OSError:  # a stand-in that refuses reads (a test runner's captured stdin)
        text = ""
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def run(args, device: str):
    """Load the checkpoint, then --eval a file, or answer prompts and print the speed."""
    ckpt = load_checkpoint(args.ckpt[0], device)
    model = model_from_checkpoint(ckpt, device, args.model)
    tok = data.tokenizer_from_dict(ckpt.get("tokenizer"))  # stored in the checkpoint: no side file
    if args.eval:
        return evaluate_file(model, args.eval, args, device, tok)
    prompts, expected = prompts_to_answer(args, ckpt)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    show = ShowSteps(tok, prompts) if args.show else None
    if args.compile:  # compile now, on the same shapes, so that the timing below is of sampling alone
        t0 = time.perf_counter()
        compile_for_sampling(model)
        generate(model, [tok.encode(p) for p in prompts], max_new_tokens=args.max_new_tokens, steps=args.steps,
                 use_cache=not args.no_cache)
        print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()  # generate() does no timing of its own: we time around it
    out = generate(model, [tok.encode(p) for p in prompts], max_new_tokens=args.max_new_tokens,
                   steps=args.steps, strategy=args.strategy, temperature=args.temperature,
                   top_p=args.top_p, confidence_threshold=args.threshold, use_cache=not args.no_cache,
                   generator=generator, on_step=show)
    if is_cuda(device):
        torch.cuda.synchronize()  # GPU work is asynchronous: wait before reading the clock
    seconds = time.perf_counter() - t0

    # one line per prompt: the prompt and its answer (checked when the answer is known)
    correct = 0
    for i, (prompt, ids) in enumerate(zip(prompts, out.tokens)):
        answer = tok.decode(ids)
        line = f"{prompt}{answer}"
        if expected is not None:
            ok = answer == expected[i]
            correct += ok
            line += "   ok" if ok else f"   (expected {expected[i]})"
        print(line)
    if expected is not None:
        print(f"exact match: {correct}/{len(prompts)}")
    print(f"{out.new_tokens} tokens in {seconds:.3f}s = {out.new_tokens / seconds:.1f} tokens/s; "
          f"network calls {out.network_calls} (decoder {out.decoder_calls}, encoder {out.encoder_calls})")


def prompts_to_answer(args, ckpt: dict) -> tuple:
    """The prompts: command line, else stdin, else held-out examples of the task the
    checkpoint was trained on (then also their expected answers, else None)."""
    prompts = args.prompts or stdin_prompts()
    if prompts:
        return prompts, None
    examples = heldout_examples(ckpt, args.num_examples, args.seed)
    return [p for p, _ in examples], [a for _, a in examples]


# --- --race: every checkpoint on the same prompts, recorded, and the page ------------------


def race_page(args, device: str, command: str):
    """Load every --ckpt, have each answer the same prompts with the same settings (the batch
    of all prompts, this process's threads), record every step (race.run_race) and write
    the page. The checkpoints must share a tokenizer: the same prompt is the same tokens."""
    ckpts = [load_checkpoint(path, device) for path in args.ckpt]
    models = [model_from_checkpoint(ckpt, device, args.model) for ckpt in ckpts]
    for path, ckpt in zip(args.ckpt[1:], ckpts[1:]):
        if ckpt.get("tokenizer") != ckpts[0].get("tokenizer"):
            raise ValueError(f"--race: {path} uses another tokenizer than {args.ckpt[0]}: the lanes would not "
                             "read the same prompts")
    tok = data.tokenizer_from_dict(ckpts[0].get("tokenizer"))
    prompts, expected = prompts_to_answer(args, ckpts[0])
    names = [race.LANES[m.cfg.model]["name"] for m in models]
    labels = [name if names.count(name) == 1 else f"{name} ({path})" for name, path in zip(names, args.ckpt)]
    if args.compile:  # run_race's warm-up compiles each model on the race's shapes
        models = [compile_for_sampling(m) for m in models]
    result = race.run_race(list(zip(labels, models)), [tok.encode(p) for p in prompts], tok, device,
                           args.repeats, args.seed, max_new_tokens=args.max_new_tokens, steps=args.steps,
                           strategy=args.strategy, temperature=args.temperature, top_p=args.top_p,
                           confidence_threshold=args.threshold, use_cache=not args.no_cache)
    for lane, ckpt in zip(result["lanes"], ckpts):  # how each model was trained, for the caption
        tc, m = ckpt.get("train_config") or {}, ckpt.get("metrics") or {}
        if tc:
            lane["trained"] = (f"Trained {ckpt.get('step', tc.get('max_steps'))} steps of batch {tc.get('batch_size')} "
                               f"on {tc.get('data') or tc.get('task')}" + (
                                   f", held-out exact match {m['exact_match']:.3f}." if "exact_match" in m else "."))
    ref = next((lane for lane in result["lanes"] if lane["model"] == "e2d2"), result["lanes"][0])
    for lane in result["lanes"]:
        ok = "" if expected is None else sum(a == b for a, b in zip(lane["final"], expected))
        right = "" if expected is None else f", exact match {ok}/{len(prompts)}"
        print(f"{lane['name']:>8}: {lane['total_ms']:8.2f} ms = {lane['total_ms'] / ref['total_ms']:.2f}x "
              f"{ref['name']}'s (without the recorder {lane['plain_ms']:.2f} ms; {lane['network_calls']} network "
              f"calls, {lane['denoising_calls']} of them denoising, {lane['calls_ms'] / lane['total_ms']:.0%} of the "
              f"time), "
              f"{lane['new_tokens']} tokens{right}")
    size = race.write_page(result, args.race, command)
    print(f"wrote {args.race} ({size / 1024:.1f} KB)")
    return result


# --- --eval: metrics on a data file ------------------------------------------------------


@torch.no_grad()
def evaluate_file(model, path: str, args, device: str, tok=None) -> dict:
    """Seq2seq pairs (.jsonl / .tsv / .csv): sample an answer for every source and report exact
    match, corpus BLEU, chrF and ROUGE-L against the targets (data.py says which BLEU).
    Anything else is plain text:
    the NELBO over consecutive windows of seq_len bytes (for AR: the exact NLL), per byte
    (total nats / total bytes), in bits per byte, and the perplexity bound
    exp(NELBO per token), each with its standard error (models.eval_nelbo: t over all of
    [0, 1], x_t ~ q(x_t | x_0) exactly, --eval_draws draws per window). tok: the
    checkpoint's tokenizer (default bytes); windows are seq_len of its tokens."""
    cfg, tok = model.cfg, tok or data.ByteTokenizer()
    if data.data_kind(path) == "seq2seq":
        try:
            result = answer_pairs(model, data.read_pairs(path), tok, args.batch_size, progress=True, steps=args.steps,
                                  strategy=args.strategy, temperature=args.temperature, top_p=args.top_p,
                                  confidence_threshold=args.threshold, use_cache=not args.no_cache)
        except ValueError as e:  # every source too long
            raise ValueError(f"{path}: {e}") from None
        result.pop("answers")
        print(f"{path}: {result['examples']} examples ({result['skipped']} skipped: source too long); exact match "
              f"{result['exact_match']:.4f}, {data.BLEU_NAME} {result['bleu']:.2f}, "
              f"chrF (character 6-grams, beta 2) {result['chrf']:.2f}, ROUGE-L F1 {result['rouge_l']:.2f}")
        return result
    # plain text: consecutive windows of seq_len tokens, all targets, --eval_draws noise draws each
    windows = data.text_windows(data.read_text(path, tok), cfg.seq_len)
    if not windows:
        raise ValueError(f"{path}: shorter than one window of seq_len={cfg.seq_len} tokens")
    g = torch.Generator(device=device).manual_seed(args.seed)
    batches = [data.TextData.collate(windows[i:i + args.batch_size], cfg.block_len, cfg.seq_len).to(device)
               for i in range(0, len(windows), args.batch_size)]
    est = eval_nelbo(model, [(b.x0, b.prompt_mask) for b in batches], args.eval_draws, g,
                     tok.bytes_per_token(), progress=True)
    f = est.figures()
    kind = "NLL" if model.exact_likelihood else "NELBO"
    draws = "exact" if model.exact_likelihood else f"{args.eval_draws} draws per window"
    print(f"{path}: {int(est.seq_bytes.sum())} bytes scored in {len(windows)} windows of {cfg.seq_len} tokens "
          f"({draws}); {kind} {f['nelbo_per_byte']:.4f} ± {f['nelbo_per_byte_se']:.4f} nats/byte, "
          f"{f['bits_per_byte']:.4f} ± {f['bits_per_byte_se']:.4f} bits/byte, perplexity <= "
          f"{f['ppl_bound']:.3f} ± {f['ppl_bound_se']:.3f} (per token; ± = standard error)")
    return {"windows": len(windows), **f}


if __name__ == "__main__":
    main()
