"""The fine-tuning walk-through (finetune.py): its runs are train.py command lines that build
their models, its choices follow the rules its docstrings state, its probe of the attention
adds up, and (slow) every stage runs end to end at tiny sizes."""
import json
import subprocess
import sys

import pytest
import torch

import data
import finetune
from conftest import ROOT, random_layout, tiny
from e2d2 import ModelConfig


@pytest.mark.parametrize("kind", ["e2d2", "bd3lm"])
def test_read_the_prompt_splits_all_attention_and_scores_every_block(kind):
    model = tiny(kind)
    _, x0, _, prompt_mask, P = random_layout(model, n_answer_blocks=3)
    r = finetune.read_the_prompt(model, x0, prompt_mask, torch.Generator().manual_seed(0))
    n_layers = model.cfg.n_dec if kind == "e2d2" else model.cfg.n_enc
    masses = r["attention"]
    assert all(len(v) == n_layers for v in masses.values())
    assert min(masses["own_block"]) > 0  # a [MASK] query always sees its own block (the noisy queries were read)
    for layer in range(n_layers):  # a [MASK] query sees the prompt, earlier blocks and its own block: nothing else
        assert sum(masses[k][layer] for k in masses) == pytest.approx(1.0)
    assert len(r["loss_by_block"]) == 3 and all(v > 0 for v in r["loss_by_block"])
    # a model that cannot see the prompt puts no weight on it: its prompt rows all padding
    x0[:, :P] = model.cfg.pad_id
    r = finetune.read_the_prompt(model, x0, prompt_mask, torch.Generator().manual_seed(0))
    assert max(r["attention"]["prompt"]) == 0.0


def test_finetune_runs_are_train_flags_that_build_their_models():
    import train  # the runs are train.py command lines: each must parse and build its model
    state = {"best_lr": {fam: lrs[0] for fam, (_, lrs) in finetune.FT_SWEPT.items()},
             "recipe": "e2d2-shared_kv-tied-top", "equal_time_steps": dict.fromkeys(finetune.ft_equal_time(False), 700)}
    names = []
    for stage in ("pretrain", "sweep", "variants", "long", "frontier"):
        for name, flags in finetune.ft_runs(stage, "D", state, quick=False).items():
            model_over, train_over = train.parse_args(flags)
            assert train_over["data"] in ("D/topics.txt", "D/vowels_train.jsonl"), name
            assert (train_over.get("init_from") == "D/ar-pre/ckpt.pt") == (name not in ("ar-pre", "ar-scratch"))
            ModelConfig(**{**model_over, "vocab_size": 260})
            names.append(name)
    assert len(names) == len(set(names))
    assert {"e2d2-ndec2-B8-equal-time", "e2d2-ndec4-B4-equal-time", "frontier-bd3lm-B4", "frontier-ndec4-B4",
            "frontier-ndec1-B8"} <= set(names)


def test_finetune_recipe_moves_off_the_papers_decoder_only_beyond_the_noise(monkeypatch):
    # every run "finished", with a validation NELBO (and its standard error) made up here
    monkeypatch.setattr(finetune.os.path, "exists", lambda path: True)
    paper = finetune.FT_SWEPT["e2d2-paper"][1]
    nelbo = {f"{fam}-lr{lr:g}": 2.0 for fam, (_, lrs) in finetune.FT_SWEPT.items() for lr in lrs}
    nelbo[f"e2d2-paper-lr{paper[-1]:g}"] = 1.70  # the paper's decoder at its best rate
    monkeypatch.setattr(finetune, "ft_val_nelbo", lambda d, name: nelbo[name])
    monkeypatch.setattr(finetune, "ft_val_nelbo_se", lambda d, name: 0.1)
    others = [n for n in finetune.FT_DECODERS if n != "e2d2-shared_kv-tied-top"]
    for n in others:
        nelbo[n] = 1.69  # better, but by far less than two standard errors (2 x 0.14)
    assert finetune.ft_state("D", False, None)["recipe"] == "e2d2-shared_kv-tied-top"
    nelbo[others[1]] = 1.70 - 0.3  # lower by more than 2 x hypot(0.1, 0.1) = 0.28
    assert finetune.ft_state("D", False, None)["recipe"] == others[1]


def test_eval_stage_keeps_scores_only_of_the_same_bleu(tmp_path, monkeypatch):
    # a run already scored at its current step is kept, unless the file's BLEU is not today's
    # (a file from before the 13a tokenisation has no "bleu"): then every run is scored again
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "ckpt.pt").write_bytes(b"")  # a finished run (its step is made up here)
    monkeypatch.setattr(finetune, "ft_task", lambda d, quick: {})
    monkeypatch.setattr(finetune, "ft_state", lambda d, quick, speed: {})
    monkeypatch.setattr(finetune, "ft_step", lambda d, name: 300)
    scored = []

    def ft_eval(d, names, quick):
        scored.extend(names)
        return {n: {"steps": 300, "test": "scored now"} for n in names}
    monkeypatch.setattr(finetune, "ft_eval", ft_eval)
    out = tmp_path / "finetune.json"
    out.write_text(json.dumps({"runs": {"a": {"steps": 300, "test": "whitespace words"}}}))
    finetune.finetune("eval", str(tmp_path), 1, 0, True, str(tmp_path), 1)
    results = json.loads(out.read_text())
    assert scored == ["a"] and results["bleu"] == data.BLEU_NAME and results["runs"]["a"]["test"] == "scored now"
    scored.clear()
    finetune.finetune("eval", str(tmp_path), 1, 0, True, str(tmp_path), 1)  # the same BLEU, the same step: kept
    assert scored == []


@pytest.mark.slow
def test_finetune_walkthrough_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "finetune.py", "--quick", f"--out_dir={tmp_path / 'runs'}",
                        f"--json_dir={tmp_path}", "--threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "finetune.json").read_text())
    assert results["bleu"] == data.BLEU_NAME  # which BLEU the scores are
    assert results["task"]["vowels"]["copy_chrf"] > 20 and results["task"]["spaces"]["copy_chrf"] == 100
    assert set(finetune.ft_equal_time(True)) | {"frontier-bd3lm-B4"} <= set(results["runs"])
    speed = json.loads((tmp_path / "finetune_speed.json").read_text())
    assert set(speed["train_step_s"]) >= {"ar", "bd3lm", "bd3lm-B4", "mdlm", "e2d2-ndec1-B4", *finetune.FT_DECODERS}
    assert set(speed["equal_time_steps"]) == set(finetune.ft_equal_time(True))
    probe = json.loads((tmp_path / "finetune_probe.json").read_text())
    runs = {k: v for k, v in probe.items() if k not in ("commit", "dirty")}  # (write_json records the code's commit)
    assert runs and all(rows[0]["step"] == 0 for rows in runs.values())
    assert "ar-scratch" in speed["decode_tokens_per_s"]  # both AR models on the frontier
    # the equal-time comparison again at the other seeds: only the seed runs train
    r = subprocess.run([sys.executable, "finetune.py", "--quick", "--stage=seeds", f"--out_dir={tmp_path / 'runs'}",
                        f"--json_dir={tmp_path}", "--threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("training ") == len(finetune.FT_SEED_BLOCKS) * 2 * (len(finetune.FT_SEEDS) - 1)
    seeds = json.loads((tmp_path / "finetune_seeds.json").read_text())
    for B in finetune.FT_SEED_BLOCKS:
        table = seeds["by_block_len"][str(B)]
        assert len(table["e2d2"]["val_nelbo"]) == len(finetune.FT_SEEDS) and table["summary"]["bd3lm"]["val_nelbo"]["n"] == 3
    # both AR models timed beside E2D2 and BD3-LM (every run already trained: nothing trains)
    r = subprocess.run([sys.executable, "finetune.py", "--quick", "--stage=ar_speed", f"--out_dir={tmp_path / 'runs'}",
                        f"--json_dir={tmp_path}", "--threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "training " not in r.stdout, r.stderr[-2000:]
    ar_speed = json.loads((tmp_path / "finetune_ar_speed.json").read_text())
    assert {"ar-scratch", "frontier-bd3lm-B4"} <= set(ar_speed["decode_tokens_per_s"]) == set(ar_speed["test"])


def test_finetune_seed_runs_repeat_the_equal_time_comparison_with_only_the_seed_changed():
    import train
    state = {"best_lr": {fam: lrs[-1] for fam, (_, lrs) in finetune.FT_SWEPT.items()},
             "recipe": "e2d2-shared_kv-tied-top", "equal_time_steps": dict.fromkeys(finetune.ft_equal_time(False), 467)}
    first = {**finetune.ft_runs("sweep", "D", state, False), **finetune.ft_runs("long", "D", state, False),
             **finetune.ft_runs("frontier", "D", state, False)}
    pairs = finetune.ft_seed_pairs(state, False)
    expected = {4: ("e2d2-ndec4-B4-equal-time", "frontier-bd3lm-B4"), 8: ("e2d2-ndec4-B8-equal-time", "bd3lm-lr0.003")}
    assert pairs == {B: expected[B] for B in finetune.FT_SEED_BLOCKS}
    runs = finetune.ft_seed_runs("D", state, False)
    assert len(runs) == 2 * len(finetune.FT_SEED_BLOCKS) * len(finetune.FT_SEEDS)
    for B, pair in pairs.items():
        for name in pair:
            assert runs[name] == first[name]  # the first seed's run is the walk-through's own
            for seed in finetune.FT_SEEDS[1:]:
                flags = runs[f"seeds/{name}-seed{seed}"]
                assert flags == first[name] + [f"--seed={seed}"]  # the same run (steps, lr, B), another seed
                model_over, train_over = train.parse_args(flags)
                assert train_over["seed"] == seed and model_over["block_len"] == B


def test_finetune_seed_table_pairs_each_seed_and_counts_the_wins():
    state = {"best_lr": {"bd3lm": 0.003}}
    rows = {}
    for B, (e2d2, bd3lm) in finetune.ft_seed_pairs(state, False).items():
        for i, seed in enumerate(finetune.FT_SEEDS):
            # E2D2 ahead on chrF at T = B at two seeds of three, BD3-LM lower NELBO at every seed
            chrf = {"e2d2": [30.0, 32.0, 20.0][i], "bd3lm": [28.0, 29.0, 25.0][i]}
            for model, name in (("e2d2", e2d2), ("bd3lm", bd3lm)):
                rows[finetune.seed_run(name, seed)] = {"steps": 300, "val_nelbo": 1.0 + (model == "e2d2") + i,
                                                    "val_curve": [[300, 1.0 + (model == "e2d2") + i, 0.05]],
                                                    "test": {str(B): {"chrf": chrf[model]}, str(B // 2): {"chrf": 1.0}}}
    t = finetune.ft_seed_table(rows, state, False)["by_block_len"]["4"]
    assert t["e2d2"]["chrf_T4"] == [30.0, 32.0, 20.0]
    assert t["summary"]["e2d2"]["chrf_T4"]["mean"] == pytest.approx(82 / 3)
    assert t["e2d2_minus_bd3lm"]["chrf_T4"]["mean"] == pytest.approx((2 + 3 - 5) / 3)
    assert t["e2d2_minus_bd3lm"]["chrf_T4"]["sd"] == pytest.approx(4.3589, abs=1e-4)  # of (2, 3, -5)
    assert t["e2d2_ahead_on_seeds"] == {"val_nelbo": 0, "chrf_T4": 2, "chrf_T2": 0}


# --- the recipe protocol: defaults that hold over two tasks and two budgets ------------

def test_recipe_runs_sweep_every_setting_at_every_rate_from_each_tasks_ar():
    import train
    for task, half in (("pydoc", 4), ("docstrings", 2)):  # N_dec = N / 2 of an AR of N = 8 and N = 4
        for budget in finetune.RECIPE_BUDGETS:
            runs = finetune.recipe_runs("O", task, budget, quick=False)
            assert len(runs) == len(finetune.RECIPE_SETTINGS) * len(finetune.RECIPE_LRS) == 12
            for name, flags in runs.items():
                model_over, train_over = train.parse_args(flags)
                assert train_over["init_from"] == f"O/{task}/ar-pre/ckpt.pt" and train_over["max_steps"] == budget
                assert name.endswith(f"-lr{train_over['lr']:g}-{budget}") and train_over["min_lr"] == pytest.approx(train_over["lr"] / 10)
                assert model_over["seq_len"] == finetune.RECIPE_TASKS[task]["seq_len"]
                if model_over["model"] == "e2d2":
                    assert model_over["n_dec"] == half and model_over["decoder_layers"] == "top"
                ModelConfig(**{**model_over, "vocab_size": 260})
        pre = train.parse_args(finetune.recipe_pretrain(f"O/{task}", task, quick=False))
        assert pre[0]["n_enc"] == 2 * half and pre[1]["data"] == f"O/{task}/text.txt"
        assert pre[0]["seq_len"] == finetune.RECIPE_TASKS[task]["seq_len"]


def test_recipe_default_is_the_best_worst_cell_not_the_best_cell():
    # worked by hand: "hot" wins the short cells, loses the long ones; "cool" is never first
    # but never far behind; "cold" is behind everywhere. Ratios to each cell's best:
    #   hot:  1.00, 1.00, 30/40 = 0.75, 33/44 = 0.75   -> worst 0.75
    #   cool: 18/20 = 0.90, 27/30 = 0.90, 1.00, 1.00  -> worst 0.90
    #   cold: 10/20 = 0.50, ...                        -> worst 0.50
    table = {"a:300": {"hot": 20.0, "cool": 18.0, "cold": 10.0, "b": 5.0},
             "b:300": {"hot": 30.0, "cool": 27.0, "cold": 20.0, "b": 5.0},
             "a:1200": {"hot": 30.0, "cool": 40.0, "cold": 39.0, "b": 5.0},
             "b:1200": {"hot": 33.0, "cool": 44.0, "cold": 40.0, "b": 6.0}}
    chosen = finetune.recipe_choose(table, {"hot": "m", "cool": "m", "cold": "m", "b": "other"})
    assert chosen["m"]["default"] == "cool" and chosen["m"]["worst_ratio"] == pytest.approx(0.9)
    assert chosen["m"]["by_candidate"]["hot"] == pytest.approx(0.75) and chosen["m"]["worst_cell"] in ("a:300", "b:300")
    assert chosen["other"] == {"default": "b", "worst_ratio": 1.0, "worst_cell": "a:300", "by_candidate": {"b": 1.0}}
    # the rule a 300-step sweep amounts to (best in one cell) picks the other one
    assert max(table["a:300"], key=lambda c: table["a:300"][c] if c != "b" else 0) == "hot"


def test_docstrings_task_is_another_text_with_held_out_test_phrases(monkeypatch):
    # a stand-in for the standard library (the real one takes seconds to parse): the texts are
    # looked up by name, and the pairs are cut from whichever text is asked for
    para = lambda i: f"Return the {i}th element of the sequence, or raise an error when it is missing."  # noqa: E731
    monkeypatch.setitem(data.TEXTS, "docstrings", lambda: "\n\n".join(para(i) for i in range(200)).encode())
    monkeypatch.setattr(data, "_TEXT_CACHE", {})
    train_pairs, test_pairs = (data.pydoc_task_pairs(s, text="docstrings", seq_len=128) for s in ("train", "test"))
    assert train_pairs and test_pairs
    text = data.TEXTS["docstrings"]().decode()
    for src, tgt in train_pairs + test_pairs:
        assert src == "".join(c for c in tgt if c not in "aeiouAEIOU") and tgt in text  # the vowels taken out of a phrase
    assert {t for _, t in test_pairs}.isdisjoint(t for _, t in train_pairs)
    held_out = text[int(len(text) * 0.9):]  # the test phrases come from the text's held-out tail
    assert all(t in held_out or t.split()[-1] in held_out for _, t in test_pairs)
    assert data.pydoc_task_pairs("test", seq_len=128)[0] != test_pairs[0]  # the default text is still pydoc's
    with pytest.raises(ValueError, match="unknown text 'plays'"):
        data.text_bytes("plays")


@pytest.mark.slow  # parses the standard library twice (seconds each)
def test_stdlib_docstrings_text_is_english_prose_about_the_library():
    text = data.stdlib_docstrings_text().decode()
    assert len(text) > 500_000 and "Return " in text
    assert text == data.stdlib_docstrings_text().decode()  # the same bytes each time (sorted walk)
    from pydoc_data.topics import topics
    assert text[:2000] not in "\n\n".join(topics.values())  # another text than the walk-through's


@pytest.mark.slow
def test_recipe_protocol_runs_end_to_end(tmp_path, monkeypatch, capsys):
    # tiny models, tiny budgets, a small stand-in text for each task: every cell trains,
    # is scored once and enters the table; recipe_table then scores nothing again
    words = "the function returns a list of values from the module and raises an error otherwise".split()
    text = "\n\n".join(" ".join(words[i % 7:] + words[:i % 7]) for i in range(400)).encode()
    for name in data.TEXTS:
        monkeypatch.setitem(data.TEXTS, name, lambda text=text: text)
    monkeypatch.setattr(data, "_TEXT_CACHE", {})
    out, js = str(tmp_path / "runs"), str(tmp_path)
    finetune.finetune("recipe", out, 2, 1, True, js, 1, cells=("pydoc:3",))  # one cell's runs only
    first = json.loads((tmp_path / "finetune_recipe.json").read_text())
    assert first["complete_cells"] == ["pydoc:3"] and first["chrf_table"]["pydoc:3"].keys() == {
        f"{s}-lr{lr:g}" for s in finetune.RECIPE_SETTINGS for lr in finetune.RECIPE_QUICK["lrs"]}
    finetune.finetune("recipe", out, 2, 1, True, js, 1)  # the rest
    result = json.loads((tmp_path / "finetune_recipe.json").read_text())
    assert len(result["complete_cells"]) == 4 and set(result["chosen"]) == {"e2d2", "bd3lm", "ar"}
    assert all(0 < c["worst_ratio"] <= 1 for c in result["chosen"].values())
    versus = result["e2d2_versus"]  # E2D2's default and today's recipe against BD3-LM's default, in every cell
    assert set(versus) == set(result["complete_cells"]) and all(set(v) == {"default", "init_recipe"} for v in versus.values())
    for cell, v in versus.items():
        row = result["chrf_table"][cell]
        r = v["init_recipe"]
        assert r["chrf"] == row["e2d2-shared_kv-tied-lr0.003"]
        assert r["to_bd3lm_default"] == pytest.approx(r["chrf"] / row[result["chosen"]["bd3lm"]["default"]])
    scores = list(tmp_path.glob("runs/*/runs/*/score.json"))
    assert len(scores) == 4 * 8
    stamps = [p.stat().st_mtime_ns for p in scores]
    capsys.readouterr()
    finetune.finetune("recipe_table", out, 2, 1, True, js, 1)
    assert [p.stat().st_mtime_ns for p in scores] == stamps  # kept, not scored again
    assert "e2d2: default" in capsys.readouterr().out
