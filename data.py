r"""
Data for e2d2: a byte-level tokenizer, built-in tasks that generate their own data, and
batching into the block-aligned layout the model trains and samples with.

Layout of one training sequence (B = block_len), prompt left-padded to a block boundary:

    [PAD .. PAD  p r o m p t] [a n s w e r EOS EOS ..] [PAD .. PAD]
     \_____ P' = ceil(P/B)*B _/ \__ whole blocks ___/    \_ to the batch length _/

- the answer starts at a block boundary, so every answer block is all targets;
- [EOS] ends the answer and fills the rest of its block (so the model learns to finish
  a block with [EOS]; the sampler stops a sequence after that block);
- PAD is padding: never attended to, never a target.
The sampler (e2d2.left_pad) builds the same layout for its prompts.
"""

import random
import zlib
from dataclasses import dataclass

import torch

# --- tokenizer ------------------------------------------------------------------------

PAD, BOS, EOS, MASK = 256, 257, 258, 259  # after the 256 byte values
VOCAB_SIZE = 260


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; four special tokens follow. No downloads."""

    pad_id, bos_id, eos_id, mask_id, vocab_size = PAD, BOS, EOS, MASK, VOCAB_SIZE

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids, mask_char: str = "_", eos_char: str = "") -> str:
        """Token ids -> text. Never raises: invalid UTF-8 becomes U+FFFD, PAD/BOS vanish,
        [MASK] shows as `mask_char`, [EOS] as `eos_char`, unknown ids as U+FFFD."""
        out, run = [], bytearray()
        for t in (int(i) for i in ids):
            if 0 <= t < 256:
                run.append(t)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append({PAD: "", BOS: "", EOS: eos_char, MASK: mask_char}.get(t, "\ufffd"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


# --- built-in tasks -------------------------------------------------------------------
# Each task maps a random example to (prompt, answer) strings. Held-out examples are
# chosen by a hash of the prompt, so no training step can ever draw one.


def is_heldout(prompt: str) -> bool:
    return zlib.crc32(prompt.encode("utf-8")) % 10 == 0  # 10% of all prompts


class Addition:
    """'123+456=' -> '579': multi-digit addition, n_digits digits per operand."""

    def __init__(self, n_digits: int = 3):
        if n_digits < 1:
            raise ValueError(f"n_digits must be >= 1, got {n_digits}")
        self.n_digits = n_digits

    def sample(self, rng: random.Random):
        lo, hi = 10 ** (self.n_digits - 1), 10**self.n_digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return f"{a}+{b}=", str(a + b)

    def max_lengths(self):
        """(longest prompt, longest answer) in tokens."""
        return 2 * self.n_digits + 2, self.n_digits + 1


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """0 <= n < 10**9 in American English: 4071 -> 'four thousand seventy-one'."""
    if not 0 <= n < 10**9:
        raise ValueError(f"number_to_words handles 0 <= n < 10**9, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for size, name in ((10**6, "million"), (1000, "thousand")):
        if n >= size:
            rest = n % size
            head = number_to_words(n // size) + " " + name
            return head + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


class Words:
    """'40571=' -> 'forty thousand five hundred seventy-one': a number written in words
    (a small translation task). Numbers have 1 to max_digits digits, each length equally
    likely."""

    def __init__(self, max_digits: int = 6):
        if not 1 <= max_digits <= 9:
            raise ValueError(f"max_digits must be in 1..9, got {max_digits}")
        self.max_digits = max_digits

    def sample(self, rng: random.Random):
        digits = rng.randint(1, self.max_digits)
        n = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
        return f"{n}=", number_to_words(n)

    def max_lengths(self):
        """(longest prompt, longest answer) in tokens."""
        return self.max_digits + 1, _longest_words(self.max_digits)


def _longest_words(digits: int) -> int:
    """Length of the longest number_to_words(n) over numbers of at most `digits` digits."""
    if digits <= 3:
        return max(len(number_to_words(n)) for n in range(10**digits))
    if digits <= 6:
        return _longest_words(digits - 3) + len(" thousand ") + _longest_words(3)
    return _longest_words(digits - 6) + len(" million ") + _longest_words(6)


TASKS = {"addition": Addition, "words": Words}


def get_task(name: str, digits: int = 0):
    """A built-in task by name; digits > 0 sets its size (operand digits / max digits)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks are {sorted(TASKS)}")
    return TASKS[name](digits) if digits > 0 else TASKS[name]()


def task_examples(task, split: str, n: int, seed: int) -> list:
    """n examples (prompt, answer) of `split` ("train" or "val"), a pure function of seed."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = random.Random(f"{split}:{seed}")
    out = []
    while len(out) < n:
        prompt, answer = task.sample(rng)
        if is_heldout(prompt) == (split == "val"):
            out.append((prompt, answer))
    return out


def train_examples(task, batch_size: int, seed: int, step: int) -> list:
    """The training examples of one step: a pure function of (seed, step), so a resumed
    run sees exactly the batches an uninterrupted one would."""
    return task_examples(task, "train", batch_size, seed * 1_000_003 + step)


# --- batching -------------------------------------------------------------------------


@dataclass
class Batch:
    x0: torch.Tensor  # (b, L) clean tokens, PAD where padding
    prompt_mask: torch.Tensor  # (b, L) True on the prompt region (positions < P')
    prompt_len: int  # P': where the answers start (a multiple of block_len)

    def to(self, device):
        return Batch(self.x0.to(device), self.prompt_mask.to(device), self.prompt_len)


def ceil_to(n: int, m: int) -> int:
    return m * ((n + m - 1) // m)


def collate(pairs: list, block_len: int, seq_len: int) -> Batch:
    """pairs: list of (prompt_ids, answer_ids). Returns the block-aligned Batch.
    Raises ValueError naming the example if one cannot fit in seq_len."""
    if not pairs:
        raise ValueError("collate needs at least one example")
    for i, (p, a) in enumerate(pairs):
        need = ceil_to(len(p), block_len) + ceil_to(len(a) + 1, block_len)
        if need > seq_len:
            raise ValueError(
                f"example {i} has a prompt of {len(p)} and an answer of {len(a)} tokens: with "
                f"[EOS] and block alignment (block_len={block_len}) it needs {need} positions, "
                f"more than the model's seq_len={seq_len}"
            )
    P = ceil_to(max(len(p) for p, _ in pairs), block_len)
    A = max(ceil_to(len(a) + 1, block_len) for _, a in pairs)
    if P + A > seq_len:
        raise ValueError(
            f"this batch needs {P} prompt + {A} answer positions, more than seq_len={seq_len}: "
            f"its longest prompt and its longest answer do not fit together"
        )
    x0 = torch.full((len(pairs), P + A), PAD, dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        x0[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        end = P + ceil_to(len(a) + 1, block_len)  # answer, then EOS to its block's end
        x0[i, P:end] = EOS
        x0[i, P:P + len(a)] = torch.tensor(a, dtype=torch.long)
    prompt_mask = torch.zeros_like(x0, dtype=torch.bool)
    prompt_mask[:, :P] = True
    return Batch(x0, prompt_mask, P)


def encode_pairs(tok: ByteTokenizer, examples: list) -> list:
    return [(tok.encode(p), tok.encode(a)) for p, a in examples]
