"""The committed checkpoint a lab starts from (checkpoints/addition.pt, README "A lab in two
minutes"): it loads with today's code (its checksum holds, its config rebuilds the model) and
answers held-out sums. If a change to the model or the checkpoint format breaks it, this
fails, and the README's command to make it again is `python train.py` (then drop the
optimizer state, as the README says)."""
import os

import data
from conftest import ROOT
from e2d2 import generate
from models import load_checkpoint, model_from_checkpoint


def test_the_committed_checkpoint_answers_held_out_sums():
    ckpt = load_checkpoint(os.path.join(ROOT, "checkpoints", "addition.pt"), "cpu")
    model = model_from_checkpoint(ckpt, "cpu")
    assert ckpt["train_config"]["task"] == "addition" and "optimizer" not in ckpt  # weights only: 5 MB
    tok = data.ByteTokenizer()
    pairs = data.task_examples(data.get_task("addition", 3), "val", 64, seed=1)  # held out of its training
    out = generate(model, [tok.encode(p) for p, _ in pairs])
    right = sum(tok.decode(ids) == answer for ids, (_, answer) in zip(out.tokens, pairs))
    assert right >= 0.95 * len(pairs), f"{right}/{len(pairs)} held-out sums right"
