"""The model registry (models.MODELS): every entry has what the scripts need, and the tests
below run every entry, so a model added to the registry is built, trained, sampled, costed
and started from an AR checkpoint (or refused, clearly) the moment it is added. The
registries of schedules, strategies and data formats are iterated where they are used
(tests/test_eval.py, test_math.py, test_model.py, test_data.py)."""
import dataclasses

import pytest
import torch

import models
from baselines import AR
from conftest import random_layout, tiny
from e2d2 import TokenModel, generate
from models import MODELS, ModelSpec, init_from_checkpoint, model_spec, same_stack


def tiny_ar_checkpoint():
    ar = tiny("ar", n_enc=3)
    return ar, {"config": {**vars(ar.cfg)}, "model": ar.state_dict(), "tokenizer": {"kind": "bytes"}}


@pytest.mark.parametrize("name", models.MODEL_TYPES)
def test_every_model_trains_and_samples_the_same_with_and_without_its_cache(name):
    spec = model_spec(name)
    assert issubclass(spec.cls, TokenModel) and isinstance(spec.has_cache, bool)
    model = tiny(name)
    assert isinstance(spec.depth(model.cfg), str) and spec.training_cost(model.cfg) >= model.cfg.n_enc
    _, x0, _, prompt_mask, P = random_layout(model)
    model.train()
    loss = model(x0, prompt_mask, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert torch.isfinite(loss)
    unused = spec.unused_parameters(model.cfg)  # what DDP is told: exactly whether some get no gradient
    assert unused == any(p.grad is None for p in model.parameters()), name
    model.eval()
    prompts = [[7, 8, 9], [5] * 6]
    kw = dict(max_new_tokens=8, steps=2, stop_at_eos=False)
    cached, uncached = generate(model, prompts, use_cache=True, **kw), generate(model, prompts, use_cache=False, **kw)
    assert cached.tokens == uncached.tokens and all(len(t) == 8 for t in cached.tokens)


@pytest.mark.parametrize("name", models.MODEL_TYPES)
def test_every_model_starts_from_an_ar_checkpoint_or_refuses_clearly(name):
    ar, ckpt = tiny_ar_checkpoint()
    model = tiny(name, n_enc=3)
    try:
        init_from_checkpoint(model, ckpt)
    except ValueError as e:  # a refusal names the model and the parameter it has no AR weight for
        assert f"a {name} model cannot start from an AR checkpoint" in str(e)
        return
    assert torch.equal(model.embed.weight, ar.embed.weight)  # the shared vocabulary is the AR's
    for pname, p in model.state_dict().items():  # and every weight is the AR weight the entry names
        assert torch.equal(p, ar.state_dict()[model_spec(name).ar_weight(model, pname)]), pname


class ARWithGate(AR):
    """A new model type a maintainer might add: an AR with one parameter an AR lacks."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gate = torch.nn.Parameter(torch.ones(cfg.d_model))


def test_a_new_model_is_taken_by_the_scripts_or_refused_clearly(monkeypatch):
    with pytest.raises(TypeError):  # an entry without every field is an error at once
        ModelSpec(ARWithGate, depth=lambda cfg: "N")
    _, ckpt = tiny_ar_checkpoint()
    monkeypatch.setitem(MODELS, "ar_gate", dataclasses.replace(MODELS["ar"], cls=ARWithGate, ar_weight=same_stack))
    model = tiny("ar_gate", n_enc=3)
    assert isinstance(model, ARWithGate)
    with pytest.raises(ValueError, match="a ar_gate model cannot start from an AR checkpoint .*parameter gate"):
        init_from_checkpoint(model, ckpt)
    with pytest.raises(ValueError, match="model must be one of"):
        model_spec("prefix_lm")
