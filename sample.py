"""
Sample from a trained E2D2 checkpoint.

    python sample.py "123+456=" "905+77="      # prompts on the command line
    echo "123+456=" | python sample.py          # or one prompt per line on stdin
    python sample.py                            # or held-out examples of the trained task
    python sample.py --show "123+456="          # watch every block being denoised

Prints one answer per prompt, then the speed: generated tokens/s and the number of
network calls (denoising steps that ran the decoder) and encoder calls.
"""

import argparse
import sys

import torch

import data
from e2d2 import build_model, config_from_dict, generate


def load_checkpoint(path: str, device: str) -> tuple:
    """Rebuild the model from the config saved in the checkpoint; clear errors if the file
    is missing or is not an e2d2 checkpoint."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        sys.exit(f"error: no checkpoint at {path} (train one with: python train.py)")
    except Exception as e:  # truncated or not a torch file
        sys.exit(f"error: cannot read checkpoint {path}: {e.__class__.__name__}: {e}")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        sys.exit(f"error: {path} is not an e2d2 checkpoint (no config/model inside)")
    try:
        model = build_model(config_from_dict(ckpt["config"])).to(device)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: checkpoint {path} does not match this code's models: {e}")
    model.eval()
    return model, ckpt


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
    args = p.parse_args(argv)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, ckpt = load_checkpoint(args.ckpt, device)
    tok = data.ByteTokenizer()

    # prompts: command line, else stdin, else held-out examples of the task trained on
    expected = None
    prompts = args.prompts
    if not prompts and not sys.stdin.isatty():
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        tc = ckpt.get("train_config", {})
        task = data.get_task(tc.get("task", "addition"), tc.get("digits", 0))
        examples = data.task_examples(task, "val", args.num_examples, args.seed)
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


if __name__ == "__main__":
    main()
