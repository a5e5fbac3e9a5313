"""
Sample from a trained checkpoint (E2D2 or a baseline).

    python sample.py "123+456=" "905+777="     # prompts on the command line
    echo "123+456=" | python sample.py          # or one prompt per line on stdin
    python sample.py                            # or held-out examples of the trained task
    python sample.py --show "123+456="          # watch every block being denoised
    python sample.py --eval test.jsonl          # exact match, BLEU, ROUGE-L
    python sample.py --eval test.txt            # NELBO per byte, bits per byte, perplexity bound
    python sample.py --bench                    # sampling speed of every model, side by side

Prints one answer per prompt, then the speed: generated tokens/s and the number of
network calls (denoising steps that ran the decoder) and encoder calls.
"""

import argparse
import sys
import time

import torch
from tqdm import tqdm

import data
from e2d2 import autocast_for, build_model, config_from_dict, eval_nelbo, generate, is_cuda, pick_device


def load_checkpoint(path: str, device: str, model_type: str = "") -> tuple:
    """Rebuild the model from the config saved in the checkpoint; clear errors if the file
    is missing, is not a checkpoint of this project, or holds another model type."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        sys.exit(f"error: no checkpoint at {path} (train one with: python train.py)")
    except Exception as e:  # truncated or not a torch file
        sys.exit(f"error: cannot read checkpoint {path}: {e.__class__.__name__}: {e}")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        sys.exit(f"error: {path} is not an e2d2 checkpoint (no config/model inside)")
    saved = ckpt["config"].get("model", "e2d2")
    if model_type and saved != model_type:
        sys.exit(f"error: {path} holds a {saved!r} model, not {model_type!r}")
    try:
        cfg = config_from_dict(ckpt["config"], data.prompt_attention_of(ckpt.get("train_config") or {}))
        model = build_model(cfg).to(device)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: checkpoint {path} does not match this code's models: {e}")
    model.eval()
    return model, ckpt


def heldout_examples(tc: dict, cfg, n: int, seed: int) -> list:
    """(prompt, answer) strings held out from what the checkpoint was trained on."""
    if not tc.get("data"):
        task = data.get_task(tc.get("task", "addition"), tc.get("digits", 0))
        return data.task_examples(task, "val", n, seed)
    if data.data_kind(tc["data"], tc.get("data_format", "auto")) == "text":
        raise ValueError(f"the model was trained on plain text ({tc['data']}): give a prompt")
    tok = data.ByteTokenizer()
    pairs = data.PairsData(tc["data"], tok, cfg.block_len, cfg.seq_len, tc.get("val_fraction", 0.1))
    return [(tok.decode(p), tok.decode(a)) for p, a in pairs.val_examples(n)]


class ShowSteps:
    """on_step callback for --show: prints each sequence's answer after every step, with
    [MASK] as '_' (earlier blocks are final; the current block is being denoised)."""

    def __init__(self, tok, prompts):
        self.tok, self.prompts = tok, prompts
        self.done = [[] for _ in prompts]  # finished blocks of each sequence
        self.current = [None] * len(prompts)  # (block index, tokens) being denoised

    def __call__(self, block, step, rows, x):
        for row, tokens in zip(rows.tolist(), x.tolist()):
            if self.current[row] is not None and self.current[row][0] != block:
                self.done[row] += self.current[row][1]
            self.current[row] = (block, tokens)
            text = self.tok.decode(self.done[row], eos_char="$")
            now = self.tok.decode(tokens, mask_char="_", eos_char="$")
            print(f"  [{row}] block {block} step {step + 1}: {self.prompts[row]}{text}|{now}|")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="prompts (default: stdin, else held-out examples)")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint path (default out/ckpt.pt)")
    p.add_argument("--model", default="", help="fail unless the checkpoint holds this model type")
    p.add_argument("--eval", default="", help="evaluate on a data file: .jsonl/.tsv pairs (exact "
                   "match, BLEU, ROUGE-L) or plain text (NELBO and perplexity bound)")
    p.add_argument("--batch_size", type=int, default=64, help="--eval: sequences per batch")
    p.add_argument("--eval_draws", type=int, default=4,
                   help="--eval on text: draws of (t, x_t) per window for the NELBO estimate")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block (default block_len)")
    p.add_argument("--strategy", choices=["remask", "ancestral"], default="remask")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--threshold", type=float, default=None,
                   help="also reveal every [MASK] whose confidence exceeds this")
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--no_cache", action="store_true", help="re-run encoder+decoder over everything each step")
    p.add_argument("--show", action="store_true", help="print every denoising step")
    p.add_argument("--num_examples", type=int, default=8, help="held-out examples when no prompt is given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--bench", action="store_true",
                   help="measure sampling speed of every model type side by side (random weights)")
    p.add_argument("--bench_batches", default="1,8", help="--bench: batch sizes")
    p.add_argument("--bench_repeats", type=int, default=3, help="--bench: timed runs (median)")
    p.add_argument("--out", default="", help="--bench: also write the figures to this JSON file")
    args = p.parse_args(argv)

    try:
        device = pick_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.bench:
        return bench_sampling([int(b) for b in args.bench_batches.split(",")], args.bench_repeats,
                              device, args.out)
    model, ckpt = load_checkpoint(args.ckpt, device, args.model)
    tok = data.ByteTokenizer()
    if args.eval:
        try:
            return evaluate_file(model, args.eval, args, device)
        except ValueError as e:
            sys.exit(f"error: {e}")

    # prompts: command line, else stdin, else held-out examples of the task trained on
    expected = None
    prompts = args.prompts
    if not prompts and not sys.stdin.isatty():
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        try:
            examples = heldout_examples(ckpt.get("train_config", {}), model.cfg, args.num_examples, args.seed)
        except ValueError as e:
            sys.exit(f"error: {e}")
        prompts, expected = [p for p, _ in examples], [a for _, a in examples]

    generator = torch.Generator(device=device).manual_seed(args.seed)
    show = ShowSteps(tok, prompts) if args.show else None
    try:
        out = generate(model, [tok.encode(p) for p in prompts], max_new_tokens=args.max_new_tokens,
                       steps=args.steps, strategy=args.strategy, temperature=args.temperature,
                       confidence_threshold=args.threshold, use_cache=not args.no_cache,
                       generator=generator, on_step=show)
    except ValueError as e:
        sys.exit(f"error: {e}")

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
    print(f"{out.new_tokens} tokens in {out.seconds:.3f}s = {out.new_tokens / out.seconds:.1f} tokens/s; "
          f"network calls {out.network_calls} (decoder {out.decoder_calls}, encoder {out.encoder_calls})")


# --- --eval: metrics on a data file ------------------------------------------------------


@torch.no_grad()
def evaluate_file(model, path: str, args, device: str) -> dict:
    """Seq2seq pairs (.jsonl / .tsv): sample an answer for every source and report exact
    match, corpus BLEU and ROUGE-L against the targets. Anything else is plain text:
    the NELBO over consecutive windows of seq_len bytes (for AR: the exact NLL), per byte
    (total nats / total bytes), in bits per byte, and the perplexity bound
    exp(NELBO per token), each with its standard error (e2d2.eval_nelbo: t over all of
    [0, 1], x_t ~ q(x_t | x_0) exactly, --eval_draws draws per window)."""
    cfg, tok = model.cfg, data.ByteTokenizer()
    if path.lower().endswith((".jsonl", ".tsv")):
        pairs, skipped = [], 0
        for src, tgt in data.read_pairs(path):
            p = tok.encode(src)
            if data.ceil_to(len(p), cfg.block_len) + cfg.block_len > cfg.seq_len:
                skipped += 1  # no room left to answer this source
            else:
                pairs.append((src, tgt, p))
        if not pairs:
            raise ValueError(f"{path}: every source is too long for seq_len={cfg.seq_len}")
        hyps = []
        for i in tqdm(range(0, len(pairs), args.batch_size), desc="eval", leave=False):
            chunk = pairs[i:i + args.batch_size]
            out = generate(model, [p for _, _, p in chunk], steps=args.steps, strategy=args.strategy,
                           temperature=args.temperature, confidence_threshold=args.threshold,
                           use_cache=not args.no_cache)
            hyps += [tok.decode(ids) for ids in out.tokens]
        refs = [t for _, t, _ in pairs]
        result = {"examples": len(pairs), "skipped": skipped,
                  "exact_match": sum(h == r for h, r in zip(hyps, refs)) / len(refs),
                  "bleu": 100 * data.corpus_bleu(hyps, refs), "rouge_l": 100 * data.rouge_l(hyps, refs)}
        print(f"{path}: {len(pairs)} examples ({skipped} skipped: source too long); exact match "
              f"{result['exact_match']:.4f}, BLEU {result['bleu']:.2f}, ROUGE-L {result['rouge_l']:.2f}")
        return result
    windows = data.text_windows(data.read_text(path), cfg.seq_len)
    if not windows:
        raise ValueError(f"{path}: shorter than one window of seq_len={cfg.seq_len} bytes")
    g = torch.Generator(device=device).manual_seed(args.seed)
    batches = [data.TextData.collate(windows[i:i + args.batch_size], cfg.block_len, cfg.seq_len).to(device)
               for i in range(0, len(windows), args.batch_size)]
    with autocast_for(device):
        est = eval_nelbo(model, [(b.x0, b.prompt_mask) for b in batches], args.eval_draws, g,
                         tok.bytes_per_token(), progress=True)
    f = est.figures()
    kind = "NLL" if cfg.model == "ar" else "NELBO"
    draws = "exact" if cfg.model == "ar" else f"{args.eval_draws} draws per window"
    print(f"{path}: {int(est.seq_bytes.sum())} bytes scored in {len(windows)} windows of {cfg.seq_len} "
          f"({draws}); {kind} {f['nelbo_per_byte']:.4f} ± {f['nelbo_per_byte_se']:.4f} nats/byte, "
          f"{f['bits_per_byte']:.4f} ± {f['bits_per_byte_se']:.4f} bits/byte, perplexity <= "
          f"{f['ppl_bound']:.3f} ± {f['ppl_bound_se']:.3f} (per token; ± = standard error)")
    return {"windows": len(windows), **f}


# --- --bench: sampling speed, side by side ---------------------------------------------

# The benchmark sizes: prompt 16, answer 128, width 256, N_enc=12, N_dec=2, B=8, T=8
BENCH = dict(prompt=16, answer=128, d_model=256, n_heads=4, n_enc=12, n_dec=2, block_len=8, steps=8)
# (label, model type, use_cache)
BENCH_VARIANTS = [("e2d2 cached", "e2d2", True), ("e2d2 no cache", "e2d2", False),
                  ("bd3lm cached", "bd3lm", True), ("mdlm", "mdlm", False), ("ar cached", "ar", True)]


def sampling_cost(model: str, use_cache: bool, P: int, A: int, B: int, T: int, n_enc: int, n_dec: int):
    """Analytic cost per generated token of sampling A tokens after a P-token prompt, with
    T steps per block of B (no early stop). Returns (layer-token passes, layer calls):
    the first is what compute-bound hardware pays (linear layers; attention left out),
    the second what a latency-bound one pays (one call per layer, whatever its width).
      E2D2 cached:   prompt through the encoder; per block T decoder calls on B tokens, then
                     the encoder on the finished block (not after the last one).
      E2D2 no cache: every step re-runs encoder + decoder over prompt + blocks so far.
      BD3-LM cached: as E2D2 cached, but all N layers at every step.
      MDLM:          K * T steps (as many as the block models take), all N layers over P + A.
      AR cached:     the prompt, then one token per call."""
    K = A // B
    if model == "e2d2" and use_cache:
        tokens = P * n_enc + K * T * B * n_dec + (K - 1) * B * n_enc
        calls = n_enc + K * T * n_dec + (K - 1) * n_enc
    elif model == "e2d2":
        tokens = sum(T * (P + k * B) * (n_enc + n_dec) for k in range(1, K + 1))
        calls = K * T * (n_enc + n_dec)
    elif model == "bd3lm":
        tokens = P * n_enc + K * T * B * n_enc + (K - 1) * B * n_enc
        calls = n_enc + K * T * n_enc + (K - 1) * n_enc
    elif model == "mdlm":
        tokens, calls = K * T * (P + A) * n_enc, K * T * n_enc
    else:  # ar
        tokens, calls = (P + A - 1) * n_enc, A * n_enc
    return tokens / A, calls / A


def bench_sampling(batches: list, repeats: int, device: str, out_path: str = ""):
    """Generated tokens/s and network calls of E2D2 (with and without cache), BD3-LM, MDLM
    and AR at the same sizes, on random weights (speed does not depend on training), with
    the [EOS] stop off so that every run generates exactly `answer` tokens. Each timing is
    the median of `repeats` runs after a warm-up run."""
    import json
    import statistics

    from e2d2 import ModelConfig

    P, A, B, T = BENCH["prompt"], BENCH["answer"], BENCH["block_len"], BENCH["steps"]
    models = {}
    for name in ("e2d2", "bd3lm", "mdlm", "ar"):
        torch.manual_seed(0)
        cfg = ModelConfig(model=name, seq_len=P + A, d_model=BENCH["d_model"], n_heads=BENCH["n_heads"],
                          n_enc=BENCH["n_enc"], n_dec=BENCH["n_dec"], block_len=B)
        models[name] = build_model(cfg).to(device).eval()
    autocast = autocast_for(device)
    g = torch.Generator().manual_seed(0)
    rows, fits = [], {}
    for batch in batches:
        prompts = torch.randint(0, 256, (batch, P), generator=g).tolist()
        with autocast:
            fits[batch] = layer_time_model(models["mdlm"], batch, P + A, device)
        for label, name, use_cache in BENCH_VARIANTS:
            steps = A // B * T if name == "mdlm" else T  # MDLM: one block of A tokens, as many steps
            kw = dict(max_new_tokens=A, steps=steps, use_cache=use_cache, stop_at_eos=False)
            with autocast:
                generate(models[name], prompts, **kw)  # warm-up
                runs = [generate(models[name], prompts, **kw)
                        for _ in tqdm(range(repeats), desc=f"bench {label} b={batch}", leave=False)]
            seconds = statistics.median(r.seconds for r in runs)
            ops, calls = sampling_cost(name, use_cache, P, A, B, T, BENCH["n_enc"], BENCH["n_dec"])
            rows.append({"batch": batch, "variant": label, "tokens_per_s": batch * A / seconds,
                         "seconds": seconds, "network_calls": runs[0].network_calls,
                         "encoder_calls": runs[0].encoder_calls, "layer_tokens_per_token": ops,
                         "layer_calls_per_token": calls,
                         "predicted_s_per_token": fits[batch]["call_s"] * calls + fits[batch]["token_s"] * ops})
    print(f"sampling {A} tokens after a {P}-token prompt; width {BENCH['d_model']}, N_enc={BENCH['n_enc']}, "
          f"N_dec={BENCH['n_dec']} (baselines N={BENCH['n_enc']}), block {B}, {T} steps per block; "
          f"device={device}; median of {repeats}")
    for batch in batches:
        f = fits[batch]
        print(f"batch {batch}: one layer call costs {f['call_s'] * 1e3:.3f} ms + {f['token_s'] * 1e6:.1f} us "
              f"per token (measured on 1 and {P + A} tokens)")
    print(f"{'batch':>5} {'variant':14} {'tokens/s':>9} {'calls':>6} {'E2D2 speed-up':>13} "
          f"{'analytic: layer-tokens':>22} {'layer calls':>11} {'both, timed':>11}")
    for batch in batches:
        ref = next(r for r in rows if r["batch"] == batch and r["variant"] == "e2d2 cached")
        for r in (r for r in rows if r["batch"] == batch):
            r["speedup_measured"] = ref["tokens_per_s"] / r["tokens_per_s"]
            r["speedup_analytic_tokens"] = r["layer_tokens_per_token"] / ref["layer_tokens_per_token"]
            r["speedup_analytic_calls"] = r["layer_calls_per_token"] / ref["layer_calls_per_token"]
            r["speedup_predicted"] = r["predicted_s_per_token"] / ref["predicted_s_per_token"]
            print(f"{batch:>5} {r['variant']:14} {r['tokens_per_s']:>9.1f} {r['network_calls']:>6} "
                  f"{r['speedup_measured']:>12.2f}x {r['speedup_analytic_tokens']:>21.2f}x "
                  f"{r['speedup_analytic_calls']:>10.2f}x {r['speedup_predicted']:>10.2f}x")
    print("E2D2 speed-up = tokens/s of E2D2 cached / of the variant. Analytic = the variant's cost per "
          "token / E2D2 cached's, counted in layer-token passes (what compute-bound hardware pays), in "
          "layer calls (what a latency-bound one pays), and both weighted by the timed cost of one "
          "layer call and of one token")
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"device": device, "sizes": BENCH, "layer_time": fits, "rows": rows}, f, indent=2)
        print(f"wrote {out_path}")
    return rows


def layer_time_model(model, batch: int, n_tokens: int, device: str) -> dict:
    """Time one call of the full (bidirectional) network on `batch` x 1 and `batch` x
    n_tokens tokens and split a layer call's time into a fixed part and a per-token part:
    time(one layer, n tokens) ~ call_s + token_s * n. Small calls are latency-bound (the
    fixed part dominates); large ones compute-bound."""
    import statistics

    def timed(n):
        x = torch.randint(0, 256, (batch, n), device=device)
        no_prompt = torch.zeros_like(x, dtype=torch.bool)
        with torch.no_grad():
            model.logits(x, x, no_prompt)  # warm-up
            times = []
            for _ in range(5):
                if is_cuda(device):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.logits(x, x, no_prompt)
                if is_cuda(device):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return statistics.median(times) / model.cfg.n_enc  # per layer

    t1, tn = timed(1), timed(n_tokens)
    token_s = max(tn - t1, 0.0) / (n_tokens - 1)
    return {"call_s": max(t1 - token_s, 0.0), "token_s": token_s}


if __name__ == "__main__":
    main()
