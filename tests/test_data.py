"""Tokenizer, built-in tasks and the block-aligned batch layout."""

import pytest
import torch

import data
from data import BOS, EOS, MASK, PAD, ByteTokenizer, collate, number_to_words
from e2d2 import ModelConfig, left_pad


def test_tokenizer_roundtrip_and_bad_bytes():
    tok = ByteTokenizer()
    for s in ["123+456=", "héllo wörld ✓", ""]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode([0xFF, 0xFE, 65]) == "\ufffd\ufffdA"  # invalid UTF-8 never raises
    assert tok.decode([72, MASK, 105, EOS, PAD, BOS, 999]) == "H_i\ufffd"
    assert tok.decode([72, MASK, EOS], mask_char="?", eos_char="$") == "H?$"
    # a multi-byte character split by a special token is replaced, not an error
    e = tok.encode("é")
    assert tok.decode([e[0], MASK, e[1]]) == "\ufffd_\ufffd"


def test_special_ids_agree_with_model_defaults():
    cfg, tok = ModelConfig(), ByteTokenizer()
    assert (cfg.vocab_size, cfg.pad_id, cfg.eos_id, cfg.mask_id) == (
        tok.vocab_size, tok.pad_id, tok.eos_id, tok.mask_id)


def test_number_to_words():
    cases = {0: "zero", 7: "seven", 13: "thirteen", 40: "forty", 42: "forty-two", 100: "one hundred",
             105: "one hundred five", 999: "nine hundred ninety-nine", 1000: "one thousand",
             4071: "four thousand seventy-one", 40571: "forty thousand five hundred seventy-one",
             1000000: "one million", 2000017: "two million seventeen"}
    for n, words in cases.items():
        assert number_to_words(n) == words
    with pytest.raises(ValueError):
        number_to_words(-1)


def test_tasks_are_deterministic_and_correct():
    for name in data.TASKS:
        task = data.get_task(name)
        a = data.task_examples(task, "train", 50, seed=3)
        assert a == data.task_examples(task, "train", 50, seed=3)
        assert a != data.task_examples(task, "train", 50, seed=4)
        max_p, max_a = task.max_lengths()
        assert all(len(p) <= max_p and len(ans) <= max_a for p, ans in a)
    for p, ans in data.task_examples(data.Addition(4), "val", 100, 0):
        x, y = p[:-1].split("+")
        assert len(x) == len(y) == 4 and int(x) + int(y) == int(ans)
    for p, ans in data.task_examples(data.Words(), "val", 100, 0):
        assert number_to_words(int(p[:-1])) == ans
    with pytest.raises(ValueError, match="unknown task"):
        data.get_task("sorting")


def test_heldout_split_is_disjoint_from_training():
    task = data.get_task("addition")
    val = {p for p, _ in data.task_examples(task, "val", 500, 0)}
    train = {p for step in range(20) for p, _ in data.train_examples(task, 64, seed=0, step=step)}
    assert val and train and not (val & train)
    assert data.train_examples(task, 8, 1, 5) == data.train_examples(task, 8, 1, 5)


def test_collate_layout():
    tok = ByteTokenizer()
    batch = collate(data.encode_pairs(tok, [("12+3=", "15"), ("1+2=", "3"), ("5+5=", "10000")]), 4, 32)
    assert batch.x0.shape == (3, 12)  # the longest rows: 8 prompt + 4 or 4 prompt + 8
    row = batch.x0[0].tolist()
    assert row[:3] == [PAD] * 3 and tok.decode(row[3:8]) == "12+3="
    assert row[8:10] == tok.encode("15") and row[10:12] == [EOS, EOS]  # EOS fills the block
    # each row is laid out on its own: "1+2=" needs one prompt block, its answer the next
    assert batch.x0[1].tolist() == tok.encode("1+2=") + tok.encode("3") + [EOS] * 3 + [PAD] * 4
    assert batch.x0[2, 4:12].tolist() == tok.encode("10000") + [EOS] * 3
    assert batch.prompt_mask[0, :8].all() and not batch.prompt_mask[0, 8:].any()
    assert batch.prompt_mask[1, :4].all() and not batch.prompt_mask[1, 4:].any()
    # the sampler's prompt layout is the same left padding
    assert torch.equal(left_pad([tok.encode("12+3=")], 4, PAD)[0], batch.x0[0, :8])


def test_collate_errors():
    with pytest.raises(ValueError, match="at least one"):
        collate([], 4, 16)
    # a long prompt and a long answer fit in one batch when each fits alone
    assert collate([([1] * 8, [2]), ([1], [2] * 7)], 4, 12).x0.shape == (2, 12)


@pytest.mark.parametrize("ext", data.PAIR_FORMATS)  # every pairs format there is
def test_the_data_format_is_decided_in_one_place(ext, tmp_path):
    # data.data_format decides what a file is for training, sample.py --eval and data_kind
    # alike: a pairs extension is pairs under "auto" and "pairs", text under "text"
    path = str(tmp_path / f"some.file{ext}")
    assert data.data_format(path) == data.data_format(path, "pairs") == ext
    assert data.data_kind(path) == "seq2seq" and data.data_kind(path, "text") == "text"
    with open(path, "w") as f:
        f.write("\n\n")
    with pytest.raises(ValueError, match="the file has no examples"):  # the format's reader ran
        data.read_pairs(path)
    # anything else is plain text under "auto", and an error naming the formats under "pairs"
    assert data.data_format(str(tmp_path / "book.txt")) == data.data_format(str(tmp_path / "notes")) == "text"
    with pytest.raises(ValueError, match=r"unknown pairs file type '\.xlsx' \(use one of " + ", ".join(data.PAIR_FORMATS)):
        data.data_format(str(tmp_path / "x.xlsx"), "pairs")
    with pytest.raises(ValueError, match="data_format must be one of"):
        data.data_format(path, "xml")


# --- CSV pairs: read with the csv module, with or without a header ---------------------


def write_csv(tmp_path, text, name="p.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))  # the bytes as given: no newline translation
    return str(path)


def test_csv_with_a_header(tmp_path):
    # a first record "source,target" (any case, spaces around) is a header, not an example
    path = write_csv(tmp_path, " Source ,TARGET\r\n1=,one\r\n2=,two\r\n")
    assert data.data_format(path) == ".csv" and data.data_kind(path) == "seq2seq"
    assert data.read_pairs(path) == [("1=", "one"), ("2=", "two")]
    # only the FIRST record can be the header: a later one is an example like any other
    assert data.read_pairs(write_csv(tmp_path, "source,target\nsource,target\n"))[0] == ("source", "target")


def test_csv_without_a_header(tmp_path):
    # any other first record is an example; blank lines are skipped, as in the other formats
    path = write_csv(tmp_path, "\n1=,one\n\n2=,two\n")
    assert data.read_pairs(path) == [("1=", "one"), ("2=", "two")]
    # a spreadsheet's byte-order mark is not part of the first field
    assert data.read_pairs(write_csv(tmp_path, "\ufeffsource,target\n1=,one\n")) == [("1=", "one")]


def test_csv_quoted_fields_keep_commas_quotes_and_line_breaks(tmp_path):
    text = 'source,target\n"a, b","line one\nline two"\n"say ""hi""",ok\n3=,three\n'
    assert data.read_pairs(write_csv(tmp_path, text)) == [
        ("a, b", "line one\nline two"), ('say "hi"', "ok"), ("3=", "three")]
    # the same file trains: load_dataset reads it through the same table
    settings = dict(task="", digits=0, data=write_csv(tmp_path, text), data_format="auto", val_fraction=0.1,
                    too_long="skip")
    ds, _ = data.load_dataset(settings, block_len=4)
    assert ds.tok.decode(ds.train[0][1]) == "line one\nline two"


@pytest.mark.parametrize("text,message", [
    # a record spanning lines 2-3 (quoted line break), then a bad one starting on line 4
    ('source,target\n"x","a\nb"\n1=,one,extra\n', r"p\.csv:4: expected 2 comma-separated columns \(source, "
                                                       r"target\), found 3"),
    ('1=,one\n"a\nb",c,d\n', r"p\.csv:2: expected 2 .* found 3"),  # a bad record is named by its first line
    ("1=,one\nno comma here\n", r"p\.csv:2: expected 2 comma-separated columns .* found 1"),
    ('1=,one\n"2=,two\n', r"p\.csv:2: not valid CSV \(unexpected end of data\)"),  # a quote never closed
    ('1=,one\n"2="x,two\n', r"p\.csv:2: not valid CSV"),  # text after a closing quote
    ("source,target\n\n", r"p\.csv: the file has no examples"),
])
def test_csv_bad_rows_name_the_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        data.read_pairs(write_csv(tmp_path, text))
