r"""
Data for e2d2: a byte-level tokenizer, built-in tasks that generate their own data, and
batching into the block-aligned layout the model trains and samples with.

Also: readers for a user's own files (plain text; JSON Lines / TSV / CSV source-target pairs)
and the metrics for them (exact match, corpus BLEU, ROUGE-L).

Layout of one seq2seq training row (B = block_len), prompt left-padded to a block boundary:

    [PAD .. PAD  p r o m p t] [a n s w e r EOS EOS ..] [PAD .. PAD]
     \_____ P' = ceil(P/B)*B _/ \__ whole blocks ___/    \_ to the batch length _/

- the answer starts at a block boundary, so every answer block is all targets;
- [EOS] ends the answer and fills the rest of its block (so the model learns to finish
  a block with [EOS]; the sampler stops a sequence after that block);
- PAD is padding: never attended to, never a target.
Each row is laid out on its own (exactly what sampling that prompt alone does); the
sampler pads a batch of prompts on the left to a common P' (e2d2.left_pad), which changes
nothing: padding is never attended to and RoPE only sees relative positions.
A plain-text row is a window of the file, all target, no prompt.
"""

import csv
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
import zlib
from collections import Counter
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

    def encode_bytes(self, raw: bytes) -> list:
        """Any byte string (UTF-8 or not) -> token ids: the bytes themselves."""
        return list(raw)

    def to_bytes(self, ids) -> bytes:
        """The exact bytes that token ids stand for (special tokens stand for none): the
        inverse of encode_bytes."""
        return bytes(int(t) for t in ids if 0 <= int(t) < 256)

    def bytes_per_token(self) -> torch.Tensor:
        """(vocab_size,) how many bytes of text each token id stands for: 1 for a byte,
        0 for a special token. Figures per byte divide total nats by total bytes, so they
        stay comparable when a tokenizer's tokens are longer than one byte."""
        return (torch.arange(self.vocab_size) < 256).long()

    def to_dict(self) -> dict:
        """What a checkpoint stores to rebuild this tokenizer (tokenizer_from_dict)."""
        return {"kind": "bytes"}


# A byte-level BPE tokenizer, trained on the training data (--tokenizer=bpe). Its tokens
# are merges of bytes, so any byte string encodes and decodes back exactly, and each
# token stands for a known number of bytes (what the per-byte NELBO divides by).
#
# How bytes become something the `tokenizers` library can merge: every byte b is read
# as the character chr(b) (Latin-1 maps bytes 0..255 one-to-one to the first 256
# characters), so a token's string IS its bytes, len(token) is its byte count, and
# invalid UTF-8 is no special case. A pre-tokenizer first cuts the text into words (an
# optional space + letters, digits, other symbols, or a run of whitespace) so merges
# never cross a word boundary. The four special tokens are not known to the library at
# all: they take the ids after the learned vocabulary (as with bytes: PAD, BOS, EOS,
# MASK after 0..255), so no text can ever produce one.

TOKENIZERS = ("bytes", "bpe")
SPECIAL_TOKENS = ("PAD", "BOS", "EOS", "MASK")
_WS = r"[ \t\n\r\f\v]"  # ASCII whitespace only: bytes >= 128 are never whitespace here
WORD_SPLIT = rf" ?[A-Za-z]+| ?[0-9]+| ?[^ \t\n\r\f\vA-Za-z0-9]+|{_WS}+"


def _tokenizers_library():
    """The optional `tokenizers` package, or a clear message how to get it."""
    try:
        import tokenizers
    except ImportError:
        raise ValueError("--tokenizer=bpe needs the optional package `tokenizers`: pip install tokenizers "
                         "(or pip install -r requirements-optional.txt); --tokenizer=bytes needs nothing") from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE: token ids 0..n-1 are the learned tokens (the 256 single bytes among
    them), then PAD, BOS, EOS, MASK. Same interface as ByteTokenizer."""

    def __init__(self, json_str: str):
        tk = _tokenizers_library()
        self.inner = tk.Tokenizer.from_str(json_str)  # the library's tokenizer (no specials)
        n = self.inner.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = n, n + 1, n + 2, n + 3
        self.vocab_size = n + 4
        # each token's bytes, by id (Latin-1: one character per byte)
        self.token_bytes = [self.inner.id_to_token(i).encode("latin-1") for i in range(n)]

    @staticmethod
    def train(texts: list, vocab_size: int) -> "BPETokenizer":
        """Learn merges from `texts` (byte strings) until the vocabulary, the four special
        tokens included, has vocab_size entries (fewer if the data runs out of pairs to
        merge). Offline, a second or so for a few MB."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"--bpe_vocab={vocab_size} must be at least 260 (256 bytes + 4 special tokens)")
        tk = _tokenizers_library()
        inner = tk.Tokenizer(tk.models.BPE())  # no normalizer: the bytes are kept as they are
        inner.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(WORD_SPLIT), behavior="isolated")
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                         initial_alphabet=[chr(b) for b in range(256)])  # every byte is a token
        inner.train_from_iterator([raw.decode("latin-1") for raw in texts], trainer)
        return BPETokenizer(inner.to_str())

    def encode_bytes(self, raw: bytes) -> list:
        return self.inner.encode(raw.decode("latin-1")).ids

    def encode(self, text: str) -> list:
        return self.encode_bytes(text.encode("utf-8"))

    def to_bytes(self, ids) -> bytes:
        """The exact bytes that token ids stand for (special tokens stand for none): the
        inverse of encode_bytes."""
        return b"".join(self.token_bytes[int(t)] for t in ids if 0 <= int(t) < len(self.token_bytes))

    def decode(self, ids, mask_char: str = "_", eos_char: str = "") -> str:
        """Token ids -> text, as ByteTokenizer.decode (never raises)."""
        out, run = [], bytearray()
        for t in (int(i) for i in ids):
            if 0 <= t < len(self.token_bytes):
                run += self.token_bytes[t]
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            specials = {self.pad_id: "", self.bos_id: "", self.eos_id: eos_char, self.mask_id: mask_char}
            out.append(specials.get(t, "\ufffd"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def bytes_per_token(self) -> torch.Tensor:
        """(vocab_size,) bytes per token id; 0 for the special tokens."""
        return torch.tensor([len(b) for b in self.token_bytes] + [0] * len(SPECIAL_TOKENS))

    def to_dict(self) -> dict:
        return {"kind": "bpe", "json": self.inner.to_str()}


def tokenizer_from_dict(d) -> "ByteTokenizer | BPETokenizer":
    """The tokenizer a checkpoint stored (ckpt["tokenizer"]); none stored: bytes (every
    checkpoint written before tokenizers were stored used bytes)."""
    if not d or d.get("kind") == "bytes":
        return ByteTokenizer()
    if d.get("kind") == "bpe":
        return BPETokenizer(d["json"])
    raise ValueError(f"the checkpoint's tokenizer is of an unknown kind {d.get('kind')!r}")


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
    prompt_mask: torch.Tensor  # (b, L) True on each row's prompt region (its first P'_i positions)

    def to(self, device):
        return Batch(self.x0.to(device), self.prompt_mask.to(device))


def ceil_to(n: int, m: int) -> int:
    return m * ((n + m - 1) // m)


def example_length(prompt_len: int, answer_len: int, block_len: int) -> int:
    """Positions one example takes: its aligned prompt, then its answer + [EOS] in whole blocks."""
    return ceil_to(prompt_len, block_len) + ceil_to(answer_len + 1, block_len)


def collate(pairs: list, block_len: int, seq_len: int, pad_id: int = PAD, eos_id: int = EOS) -> Batch:
    """pairs: list of (prompt_ids, answer_ids). Returns the block-aligned Batch (rows
    right-padded to the longest). Raises ValueError naming the example if one cannot fit.
    pad_id, eos_id: the tokenizer's (default: the byte tokenizer's)."""
    if not pairs:
        raise ValueError("collate needs at least one example")
    lengths = [example_length(len(p), len(a), block_len) for p, a in pairs]
    for i, ((p, a), need) in enumerate(zip(pairs, lengths)):
        if need > seq_len:
            raise ValueError(
                f"example {i} has a prompt of {len(p)} and an answer of {len(a)} tokens: with "
                f"[EOS] and block alignment (block_len={block_len}) it needs {need} positions, "
                f"more than the model's seq_len={seq_len}"
            )
    x0 = torch.full((len(pairs), max(lengths)), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(x0, dtype=torch.bool)
    for i, (p, a) in enumerate(pairs):
        P = ceil_to(len(p), block_len)
        x0[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        x0[i, P:P + ceil_to(len(a) + 1, block_len)] = eos_id  # answer, then EOS to its block's end
        x0[i, P:P + len(a)] = torch.tensor(a, dtype=torch.long)
        prompt_mask[i, :P] = True
    return Batch(x0, prompt_mask)


def encode_pairs(tok: ByteTokenizer, examples: list) -> list:
    return [(tok.encode(p), tok.encode(a)) for p, a in examples]


# --- datasets: what train.py trains on -------------------------------------------------
# Every dataset answers: train_examples(batch_size, seed, step) (a pure function of its
# arguments, so a resumed run sees the same batches), val_examples(n), and collate.
# Seq2seq examples are (prompt_ids, answer_ids); text examples are windows of token ids.


class TaskData:
    """A built-in task (see TASKS): endless examples, the held-out ones never trained on."""

    kind = "seq2seq"

    def __init__(self, task, tok: ByteTokenizer):
        self.task, self.tok = task, tok  # (built-in tasks are always bytes)

    def max_lengths(self):
        return self.task.max_lengths()

    def train_examples(self, batch_size: int, seed: int, step: int) -> list:
        return encode_pairs(self.tok, train_examples(self.task, batch_size, seed, step))

    def val_examples(self, n: int, seed: int) -> list:
        return encode_pairs(self.tok, task_examples(self.task, "val", n, seed))

    collate = staticmethod(collate)


def jsonl_pair(line: str) -> tuple:
    """One line of a .jsonl pairs file: {"source": ..., "target": ...}."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("source"), str) or not isinstance(obj.get("target"), str):
        raise ValueError("expected an object with string fields \"source\" and \"target\"")
    return obj["source"], obj["target"]


def tsv_pair(line: str) -> tuple:
    """One line of a .tsv pairs file: source<TAB>target."""
    cols = line.split("\t")
    if len(cols) != 2:
        raise ValueError(f"expected 2 tab-separated columns (source, target), found {len(cols)}")
    return cols[0], cols[1]


class BadRow(ValueError):
    """A pairs file's record that is not an example: where it starts (line number) and why.
    read_pairs adds the file's name."""

    def __init__(self, line: int, why: str):
        super().__init__(why)
        self.line = line


def by_line(parse):
    """A pairs reader for a format of one example per line, from the parser of one line:
    text -> (line number, (source, target)) for every line that is not blank. Lines end at
    "\n", "\r\n" or "\r" (as Python's text files read them), nothing else: str.splitlines
    would also split at U+2028 and other separators that are valid characters inside a JSON
    string or a TSV field."""
    def read(text: str):
        for n, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
            if line.strip():
                try:
                    yield n, parse(line)
                except ValueError as e:
                    raise BadRow(n, str(e)) from None
    return read


CSV_HEADER = ("source", "target")


def csv_pairs(text: str):
    """A .csv pairs file, read with Python's `csv` module (the dialect spreadsheets write:
    fields separated by commas, a field with a comma, a quote or a line break inside
    "quoted", a quote inside a quoted field doubled ""): text -> (line number, (source,
    target)), one example per record of two fields. A record may span several lines (a
    quoted line break); its line number is the line where it starts.
    The header rule: a first record whose two fields are `source` and `target` (any case,
    surrounding spaces ignored) is a header and skipped; any other first record is an
    example. Records whose fields are all blank are skipped, as blank lines elsewhere."""
    lines = io.StringIO(text, newline="")  # line breaks kept as written: the csv module reads them
    reader = csv.reader(lines, strict=True)  # strict: a stray quote is an error, not a guess
    first = True
    while True:
        start = reader.line_num + 1  # the line this record starts on
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise BadRow(start, f"not valid CSV ({e})") from None
        if not any(f.strip() for f in row):  # a blank line (csv reads it as []) or only blanks
            continue
        if first and tuple(f.strip().lower() for f in row) == CSV_HEADER:
            first = False
            continue
        first = False
        if len(row) != 2:
            raise BadRow(start, f"expected 2 comma-separated columns (source, target), found {len(row)} "
                                "(a field with a comma or a line break in it goes in double quotes)")
        yield start, (row[0], row[1])


# The file formats of (source, target) pairs: extension -> the reader of the file's text,
# text -> (line number, (source, target)) for each example, a BadRow for a record that is
# not one. A new format is one reader and one entry here (by_line turns the parser of one
# line into a reader); data_format() and so training, sample.py --eval, the help texts and
# the tests take the formats from this dict.
PAIR_FORMATS = {".jsonl": by_line(jsonl_pair), ".tsv": by_line(tsv_pair), ".csv": csv_pairs}
DATA_FORMATS = ("auto", "pairs", "text")  # --data_format: by extension, pairs, or plain text


def data_format(path: str, flag: str = "auto") -> str:
    """What a data file is: one of PAIR_FORMATS' extensions (pairs) or "text". The ONE place
    this is decided. flag (--data_format): "auto" goes by the extension (anything that is not
    a pairs extension is plain text), "pairs" requires a pairs extension, "text" is text."""
    if flag not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {flag!r}")
    ext = "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if flag == "text" or (flag == "auto" and ext not in PAIR_FORMATS):
        return "text"
    if ext not in PAIR_FORMATS:
        raise ValueError(f"{path}: unknown pairs file type '{ext}' (use one of {', '.join(PAIR_FORMATS)}; "
                         f"any other file is read as plain text with --data_format=text)")
    return ext


def read_pairs(path: str, flag: str = "pairs") -> list:
    """(source, target) string pairs from a pairs file (see PAIR_FORMATS). Blank lines are
    skipped; anything else that is not an example is an error naming the file and the line."""
    fmt = data_format(path, flag)
    if fmt == "text":
        raise ValueError(f"{path}: not a pairs file (use one of {', '.join(PAIR_FORMATS)})")
    try:
        # newline="": the text exactly as written; each reader decides where lines end.
        # utf-8-sig: a byte-order mark at the start (spreadsheets write one) is not text
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        pairs = [pair for _, pair in PAIR_FORMATS[fmt](text)]
    except BadRow as e:
        raise ValueError(f"{path}:{e.line}: {e}") from None
    if not pairs:
        raise ValueError(f"{path}: the file has no examples")
    return pairs


TOO_LONG = ("skip", "error")  # --too_long: what to do with an example longer than seq_len


class PairsData:
    """A user's seq2seq examples (prompt_ids, answer_ids), read from `path`. The last
    val_fraction of them is held out. Examples too long for seq_len are skipped and
    counted (too_long="skip") or are an error."""

    kind = "seq2seq"

    def __init__(self, pairs: list, block_len: int, seq_len: int, val_fraction: float = 0.1,
                 too_long: str = "skip", path: str = "", tok=None):
        self.tok = tok or ByteTokenizer()  # what `pairs` were encoded with
        if too_long not in TOO_LONG:
            raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
        keep = []
        for i, (p, a) in enumerate(pairs):
            need = example_length(len(p), len(a), block_len)
            if need <= seq_len:
                keep.append((p, a))
            elif too_long == "error":
                raise ValueError(f"{path}: example {i + 1} needs {need} positions (prompt {len(p)}, answer "
                                 f"{len(a)} bytes, block_len={block_len}), more than seq_len={seq_len}")
        self.skipped = len(pairs) - len(keep)
        if not keep:
            raise ValueError(f"{path}: all {len(pairs)} examples are longer than seq_len={seq_len}")
        n_val = max(1, int(len(keep) * val_fraction)) if len(keep) > 1 else 0
        self.train, self.val = keep[:len(keep) - n_val], keep[len(keep) - n_val:] or keep
        self.path = path

    def max_lengths(self):
        return max(len(p) for p, _ in self.train), max(len(a) for _, a in self.train)

    def train_examples(self, batch_size: int, seed: int, step: int) -> list:
        rng = random.Random(f"train:{seed}:{step}")
        return [self.train[rng.randrange(len(self.train))] for _ in range(batch_size)]

    def val_examples(self, n: int, seed: int = 0) -> list:
        return self.val[:n]

    def collate(self, examples: list, block_len: int, seq_len: int) -> Batch:
        return collate(examples, block_len, seq_len, self.tok.pad_id, self.tok.eos_id)


def data_kind(path: str, flag: str = "auto") -> str:
    """"seq2seq" (a pairs file) or "text" for a data file (see data_format)."""
    return "text" if data_format(path, flag) == "text" else "seq2seq"


# How the clean stream reads a prompt after training on each kind of data (the
# ModelConfig field prompt_attention): seq2seq prompts were read bidirectionally; plain
# text had no prompt, only block-causal context.
PROMPT_ATTENTION = {"seq2seq": "bidirectional", "text": "block_causal"}


def prompt_attention_of(train_config: dict) -> str:
    """prompt_attention for a checkpoint saved before the field existed, from its saved
    training config (built-in tasks are seq2seq)."""
    if not train_config.get("data"):
        return PROMPT_ATTENTION["seq2seq"]
    return PROMPT_ATTENTION[data_kind(train_config["data"], train_config.get("data_format", "auto"))]


def read_bytes(path: str) -> bytes:
    """The bytes of a file; clear errors for a missing or empty file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    if not raw:
        raise ValueError(f"{path}: the file is empty")
    return raw


def read_text(path: str, tok=None) -> list:
    """A file as token ids of `tok` (default: bytes, one token per byte)."""
    return (tok or ByteTokenizer()).encode_bytes(read_bytes(path))


def text_windows(ids: list, seq_len: int) -> list:
    """Consecutive, non-overlapping windows of seq_len tokens (a shorter tail is dropped)."""
    return [ids[s:s + seq_len] for s in range(0, len(ids) - seq_len + 1, seq_len)]


def split_text(raw: bytes, val_fraction: float):
    """(training bytes, held-out bytes): the last val_fraction of the file is held out. The
    cut is made on bytes, before tokenizing, so every tokenizer holds out the same text."""
    n_val = int(len(raw) * val_fraction)
    return raw[:len(raw) - n_val], raw[len(raw) - n_val:]


class TextData:
    """A plain text file for unconditional language modelling: its tokens (bytes by
    default), the last val_fraction of the file held out, training on random windows of
    seq_len tokens (all targets)."""

    kind = "text"

    def __init__(self, path: str, seq_len: int, val_fraction: float = 0.1, tok=None):
        self.tok = tok or ByteTokenizer()
        train_raw, val_raw = split_text(read_bytes(path), val_fraction)
        self.train, self.val = self.tok.encode_bytes(train_raw), self.tok.encode_bytes(val_raw)
        if len(self.train) < seq_len or len(self.val) < seq_len:
            raise ValueError(f"{path}: {len(self.train) + len(self.val)} tokens are too few for windows of "
                             f"seq_len={seq_len} in both the training part and the held-out last {val_fraction:.0%}")
        self.seq_len, self.path = seq_len, path

    def train_examples(self, batch_size: int, seed: int, step: int) -> list:
        rng = random.Random(f"train:{seed}:{step}")
        starts = [rng.randrange(len(self.train) - self.seq_len + 1) for _ in range(batch_size)]
        return [self.train[s:s + self.seq_len] for s in starts]

    def val_examples(self, n: int, seed: int = 0) -> list:
        return text_windows(self.val, self.seq_len)[:n]

    @staticmethod
    def collate(windows: list, block_len: int, seq_len: int) -> Batch:
        x0 = torch.tensor(windows, dtype=torch.long)  # (b, seq_len)
        return Batch(x0, torch.zeros_like(x0, dtype=torch.bool))


# --- picking the dataset: the one place a data file is read ----------------------------

TEXT_SEQ_LEN = 128  # plain text trains on windows of this many bytes unless --seq_len says


def load_dataset(settings: dict, block_len: int, seq_len=None, tok=None):
    """The dataset that the training settings name, and the seq_len to use.

    settings: the data fields of train.py's TrainConfig as a dict (train.py passes
    asdict(tc); sample.py the train_config saved in a checkpoint): task, digits, data,
    data_format, val_fraction, too_long, tokenizer, bpe_vocab. seq_len: the model's, or
    None to pick one that fits every example (a task's longest; a file's longest pair;
    128-token text windows). tok: the tokenizer to use (a checkpoint's); None makes the
    one the settings name: bytes, or a BPE tokenizer trained here on the training part of
    the data file. Returns (dataset, seq_len); the tokenizer is dataset.tok."""
    s = settings
    kind = s.get("tokenizer", "bytes")  # settings saved before the flag existed: bytes
    if kind not in TOKENIZERS:
        raise ValueError(f"--tokenizer must be one of {TOKENIZERS}, got {kind!r}")
    if not s["data"]:  # a built-in task: endless generated examples
        if kind != "bytes" or not isinstance(tok or ByteTokenizer(), ByteTokenizer):
            raise ValueError("the built-in tasks are spelled in bytes: --tokenizer=bpe needs a data file (--data)")
        task = get_task(s["task"], s["digits"])
        max_p, max_a = task.max_lengths()
        return TaskData(task, ByteTokenizer()), seq_len or example_length(max_p, max_a, block_len)
    text = data_kind(s["data"], s["data_format"]) == "text"
    if tok is None and kind == "bpe":  # learn the merges from the training part only
        if text:
            sample = [split_text(read_bytes(s["data"]), s["val_fraction"])[0]]
        else:
            pairs = read_pairs(s["data"])
            sample = [(p + "\n" + a).encode("utf-8") for p, a in pairs[:len(pairs) - int(len(pairs) * s["val_fraction"])]]
        tok = BPETokenizer.train(sample, s.get("bpe_vocab", 1024))
    tok = tok or ByteTokenizer()
    if text:
        seq_len = seq_len or ceil_to(TEXT_SEQ_LEN, block_len)
        return TextData(s["data"], seq_len, s["val_fraction"], tok), seq_len
    pairs = encode_pairs(tok, read_pairs(s["data"]))  # the file, read once
    seq_len = seq_len or max(example_length(len(p), len(a), block_len) for p, a in pairs)
    return PairsData(pairs, block_len, seq_len, s["val_fraction"], s["too_long"], s["data"], tok), seq_len


# --- an English text that ships with Python, for the real-text walk-through --------------


def pydoc_topics_text() -> bytes:
    """The Python documentation topics (pydoc_data.topics, the help() texts: the language
    reference's prose and code, about 460 KB), topics in name order, blank lines between."""
    from pydoc_data.topics import topics  # a dict: topic name -> its documentation text
    return "\n\n".join(topics[name].strip() for name in sorted(topics)).encode("utf-8") + b"\n"


def stdlib_docstrings_text() -> bytes:
    """The docstrings of the standard library's own Python files (modules, classes and
    functions, in file order; about 1.5 MB): another English text that ships with Python,
    written about APIs rather than the language (its tests, idlelib, tkinter, lib2to3 and
    the demos are left out). Parsed, never imported; a few seconds."""
    import ast
    import sysconfig
    root, docs = sysconfig.get_paths()["stdlib"], []
    skip = {"test", "tests", "idlelib", "tkinter", "lib2to3", "turtledemo", "ensurepip", "site-packages", "__pycache__"}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(f for f in subfolders if f not in skip)  # the walk's order: sorted, every machine alike
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a file this Python cannot parse (a template, another encoding)
            docs += [doc.strip() for node in ast.walk(tree)
                     if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                     and (doc := ast.get_docstring(node))]
    return "\n\n".join(docs).encode("utf-8") + b"\n"


# The texts the tasks below are cut from, name -> a function that returns its bytes.
TEXTS = {"pydoc": pydoc_topics_text, "docstrings": stdlib_docstrings_text}
_TEXT_CACHE: dict = {}


def text_bytes(text: str) -> bytes:
    """The bytes of TEXTS[text], made once per process."""
    if text not in TEXTS:
        raise ValueError(f"unknown text {text!r}; choose one of {sorted(TEXTS)}")
    if text not in _TEXT_CACHE:
        _TEXT_CACHE[text] = TEXTS[text]()
    return _TEXT_CACHE[text]


def write_pydoc_topics(path: str, heldout_path: str = "", val_fraction: float = 0.1, text: str = "pydoc") -> int:
    """Write the Python documentation topics (pydoc_data.topics, the help() texts that ship
    with every Python: about 460 KB of English prose and code) to `path` as one text file,
    topics in name order, separated by blank lines. No download. heldout_path: also write
    the part that training on `path` holds out (its last val_fraction, see split_text), to
    evaluate on with sample.py --eval. Returns the bytes written to `path`.
        python -c "import data; data.write_pydoc_topics('topics.txt', 'topics_heldout.txt')"
    """
    raw = text_bytes(text)  # text="docstrings": the standard library's docstrings instead (TEXTS)
    with open(path, "wb") as f:
        f.write(raw)
    if heldout_path:
        with open(heldout_path, "wb") as f:
            f.write(split_text(raw, val_fraction)[1])
    return len(raw)


# A conditional task from the same text: each example is a phrase of the Python documentation
# (consecutive words of its prose), the prompt a damaged copy of it, the answer the phrase.
# "vowels" (the default) removes a, e, i, o, u: the consonants say which words they were, only
# someone who knows English (and these documents) can put the vowels back, and every answer
# differs. "spaces" removes the spaces (chrF ignores whitespace, so it cannot score it);
# "shuffle" shuffles the words (copying the prompt already scores a high chrF).
PYDOC_TASKS = {
    "vowels": lambda phrase, rng: re.sub("[aeiouAEIOU]", "", phrase),
    "spaces": lambda phrase, rng: phrase.replace(" ", ""),
    "shuffle": lambda phrase, rng: " ".join(rng.sample(phrase.split(), len(phrase.split()))),
}


def pydoc_phrases(text: str, fits, min_chars: int, every_word: bool) -> list:
    """Phrases of the prose of `text` (paragraphs with no indented line: no code, no tables;
    heading underlines dropped): the longest runs of whole words that fits(phrase) accepts,
    at least min_chars long, one starting at every word (every_word) or one after the other."""
    phrases = []
    for para in text.split("\n\n"):
        lines = [line for line in para.split("\n") if line.strip(" *=-~")]
        if not lines or any(line[0].isspace() for line in lines):
            continue
        words = " ".join(lines).split()
        i = 0
        while i < len(words):
            j = i  # the longest run of words from i that fits max_chars
            while j < len(words) and fits(" ".join(words[i:j + 1])):
                j += 1
            phrase = " ".join(words[i:j])
            if len(phrase) >= min_chars:
                phrases.append(phrase)
            i = i + 1 if every_word else max(j, i + 1)
    return phrases


def pydoc_task_pairs(split: str, task: str = "vowels", seq_len: int = 96, block_len: int = 8, min_chars: int = 30,
                     val_fraction: float = 0.1, text: str = "pydoc") -> list:
    """The (source, target) pairs of one split, "train" or "test", of the task that
    write_pydoc_task writes (the same arguments give the same pairs, in memory): phrases of
    pydoc_data.topics, each source the phrase damaged by PYDOC_TASKS[task]. The test phrases
    come from the last val_fraction of the text (what pretraining on the text holds out) and
    follow one another; the training phrases come from the rest and start at every word
    (overlapping). Only examples that fit seq_len with blocks of block_len (example_length).
    text="docstrings" cuts the phrases from the standard library's docstrings (TEXTS)."""
    if task not in PYDOC_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(PYDOC_TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    raw = text_bytes(text)
    damage = PYDOC_TASKS[task]

    def example(phrase):  # the same phrase always gets the same damage (shuffle: its own seed)
        return damage(phrase, random.Random(phrase)), phrase

    def fits(phrase):
        source, _ = example(phrase)
        return example_length(len(source.encode()), len(phrase.encode()), block_len) <= seq_len

    part = split_text(raw, val_fraction)[0 if split == "train" else 1]
    return [example(phrase) for phrase in pydoc_phrases(part.decode("utf-8", errors="ignore"), fits, min_chars,
                                                        every_word=split == "train")]


def write_pydoc_task(train_path: str, test_path: str, text_path: str = "", task: str = "vowels",
                     seq_len: int = 96, block_len: int = 8, min_chars: int = 30, val_fraction: float = 0.1,
                     text: str = "pydoc") -> tuple:
    """Write a seq2seq task built from pydoc_data.topics (text="docstrings": from the
    standard library's docstrings; see TEXTS, PYDOC_TASKS and pydoc_task_pairs): train and test JSON Lines files of {"source": damaged phrase,
    "target": phrase}, and (text_path) the text to pretrain an AR model on, as
    write_pydoc_topics writes it. The test phrases come from the part of the text that
    pretraining on text_path holds out (its last val_fraction), the training phrases from
    the rest: no test phrase was ever seen. Returns (training examples, test examples).
        python -c "import data; data.write_pydoc_task('vowels_train.jsonl', 'vowels_test.jsonl', 'topics.txt')"
    """
    if task not in PYDOC_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(PYDOC_TASKS)}")
    if text_path:
        write_pydoc_topics(text_path, val_fraction=val_fraction, text=text)
    counts = []
    for path, split in ((train_path, "train"), (test_path, "test")):
        pairs = pydoc_task_pairs(split, task, seq_len, block_len, min_chars, val_fraction, text)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"source": source, "target": target}) + "\n" for source, target in pairs)
        counts.append(len(pairs))
    return tuple(counts)


# --- metrics for seq2seq answers -------------------------------------------------------


# BLEU is computed on words, and which words depends on how a sentence is cut: "end." is one
# word to str.split and two ("end", ".") to the tokenizer of WMT's scoring script,
# mteval-v13a.pl, which sacreBLEU applies by default under the name "13a" and which papers
# report. Its rules, applied in order to one sentence:
#   1. drop the marker "<skipped>"; join a word hyphenated across a line break ("-\n" goes);
#      other line breaks become spaces;
#   2. turn the HTML entities &quot; &amp; &lt; &gt; back into " & < > (in that order);
#   3. every ASCII punctuation mark or symbol is a word of its own, except four: the
#      apostrophe (don't stays one word), the hyphen (well-known stays one word), and
#      the period and the comma, which are cut off unless they sit between two digits
#      (3.14 and 1,000 stay whole: "end." and "a,b" are cut, "1." and ".5" too);
#   4. a hyphen right after a digit is cut off (1990-2000 -> 1990 - 2000);
#   5. split on whitespace.
# No lowercasing, no Unicode rules: punctuation outside ASCII (« », —) stays in its word.
_13A_ALONE = re.compile("([" + re.escape("!\"#$%&()*+/:;<=>?@[\\]^_`{|}~") + "])")  # rule 3's marks
_13A_STEPS = [
    (_13A_ALONE, r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),  # a period or comma after a non-digit
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),  # ... or before one (so only digit.digit stays)
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # rule 4
]


def tokenize_13a(sentence: str) -> list:
    """The words of `sentence` by the 13a rules above (sacreBLEU's default tokenizer):
    "It's 3.5-4 km, isn't it?" -> It's 3.5 - 4 km , isn't it ?"""
    s = sentence.rstrip()  # trailing whitespace first (sacreBLEU strips it too: "x-\n" keeps its "-")
    s = s.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        s = s.replace(entity, char)
    s = f" {s} "  # so the period/comma rules see a character on both sides of every mark
    for pattern, replacement in _13A_STEPS:
        s = pattern.sub(replacement, s)
    return s.split()


# How a sentence becomes BLEU's words: "13a", what papers report (sacreBLEU's default), or
# "none", the whitespace-separated words as they are (sacreBLEU's tokenize="none").
BLEU_TOKENIZERS = {"13a": tokenize_13a, "none": str.split}

# What sample.py --eval prints beside the BLEU figure, so a reader knows which BLEU it is.
BLEU_NAME = "BLEU (sacreBLEU's default: corpus, 4-gram, exp smoothing, 13a tokens)"


def corpus_bleu(hypotheses: list, references: list, max_n: int = 4, tokenize: str = "13a") -> float:
    """Corpus BLEU (Papineni et al. 2002) in [0, 1], one reference per hypothesis, as
    sacreBLEU computes it by default (sacrebleu.corpus_bleu / 100; a test checks it): words
    cut by the 13a rules (tokenize="none": split on whitespace only), "exp" smoothing.
    The n-gram matches and counts are summed over the corpus; p_n = matches_n / total_n,
    except that the k-th order with no match at all gets p_n = 1 / (2^k * total_n)
    instead of 0 (so one missing 4-gram no longer zeroes the whole score); BLEU is the
    geometric mean of p_1..p_4 times the brevity penalty exp(1 - r/c) when the
    hypotheses (c words) are shorter than the references (r words). A corpus with no
    n-gram of some order at all (every answer one word long: no 2-grams) has no BLEU
    defined; it scores 0 as in sacreBLEU, and chrF (below) is the figure to read."""
    if tokenize not in BLEU_TOKENIZERS:
        raise ValueError(f"tokenize must be one of {sorted(BLEU_TOKENIZERS)}, got {tokenize!r}")
    words = BLEU_TOKENIZERS[tokenize]
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = words(hyp), words(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            h_grams = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            r_grams = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, r_grams[g]) for g, c in h_grams.items())  # clipped
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(totals) == 0 or not any(matches):  # no word right at all: 0
        return 0.0
    log_precision, zero_orders = 0.0, 0
    for m, t in zip(matches, totals):
        if m == 0:  # exp smoothing: 1/2, 1/4, ... of one match, for each order with none
            zero_orders += 1
            log_precision += math.log(1 / (2 ** zero_orders * t))
        else:
            log_precision += math.log(m / t)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision / max_n)


def chrf(hypotheses: list, references: list, max_n: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popovic 2015) in [0, 1], as sacreBLEU computes it by default: character
    n-grams (n = 1..6) of each string with its whitespace removed; per order n, the
    clipped matches, hypothesis and reference counts are summed over the corpus;
    precision P_n and recall R_n are averaged over the orders that occur in both
    (P, R), and chrF = (1 + beta^2) P R / (beta^2 P + R), recall weighted beta = 2 times
    as much as precision. Unlike BLEU it gives partial credit to one-word answers."""
    hyp_n, ref_n, match_n = [0] * max_n, [0] * max_n, [0] * max_n
    for hyp, ref in zip(hypotheses, references):
        h, r = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, max_n + 1):
            h_grams = Counter(h[i:i + n] for i in range(len(h) - n + 1))
            r_grams = Counter(r[i:i + n] for i in range(len(r) - n + 1))
            if r_grams:  # a reference too short for this order counts nothing against it
                hyp_n[n - 1] += sum(h_grams.values())
            ref_n[n - 1] += sum(r_grams.values())
            match_n[n - 1] += sum(min(c, r_grams[g]) for g, c in h_grams.items())
    orders = [n for n in range(max_n) if hyp_n[n] > 0 and ref_n[n] > 0]
    if not orders:
        return 0.0
    p = sum(match_n[n] / hyp_n[n] for n in orders) / len(orders)
    r = sum(match_n[n] / ref_n[n] for n in orders) / len(orders)
    if p + r == 0:
        return 0.0
    return (1 + beta ** 2) * p * r / (beta ** 2 * p + r)


def rouge_l(hypotheses: list, references: list) -> float:
    """Mean ROUGE-L F1 over the pairs, in [0, 1]: from the longest common subsequence of
    words, precision = LCS / len(hypothesis), recall = LCS / len(reference)."""
    scores = []
    for hyp, ref in zip(hypotheses, references):
        h, r = hyp.split(), ref.split()
        lcs = _lcs(h, r)
        scores.append(0.0 if lcs == 0 else 2 * lcs / (len(h) + len(r)))  # F1 = 2PR / (P + R)
    return sum(scores) / max(len(scores), 1)


def _lcs(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


# --- a learner's e2d2.py in place of e2d2.py (exercises.py, --impl) ------------------------
# It lives here, not in e2d2.py, because it must run BEFORE anything imports e2d2 (the
# scripts, models.py, baselines.py, the tests), and data.py imports no model code.

IMPL_ENV = "E2D2_IMPL"  # the scripts also take the file from this variable (the tests' subprocesses)


def impl_path(argv: list) -> str:
    """The FILE of `--impl=FILE` or `--impl FILE` in a script's argv, else $E2D2_IMPL, else ''."""
    for i, arg in enumerate(argv):
        if arg.startswith("--impl="):
            return arg[len("--impl="):]
        if arg == "--impl" and i + 1 < len(argv):
            return argv[i + 1]
    return os.environ.get(IMPL_ENV, "")


def use_impl(path: str):
    """Load the file `path` (a copy of e2d2.py, see exercises.py) as the module `e2d2`: every
    later `import e2d2` or `from e2d2 import ...` (models.py, baselines.py, the scripts, the
    tests) gets it. Call it before the first of those imports. A ValueError for a bad path."""
    if not path.endswith(".py") or not os.path.isfile(path):
        raise ValueError(f"--impl={path}: not a Python file (give the path of your copy of e2d2.py, "
                         f"e.g. the my_e2d2.py that `python exercises.py start N` writes)")
    spec = importlib.util.spec_from_file_location("e2d2", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2d2"] = module  # before it runs, as a normal import does
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["e2d2"]
        raise
    return module
