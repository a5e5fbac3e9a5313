"""
Every model by name, and checkpoints.

This small file exists so that e2d2.py can tell E2D2 alone: the registry has to see all
four models, and e2d2.py must not import baselines.py (which imports e2d2.py). The
scripts (train.py, sample.py, bench.py) build and reload models only through here.

A checkpoint is a dict saved by train.py: the model config as a dict (asdict), the
weights, and for training the optimizer state and the step. The model is rebuilt from
the saved config, so a checkpoint needs no flags to be read back.
"""

import os
from dataclasses import fields

import torch

from baselines import AR, BD3LM, MDLM
from e2d2 import E2D2, ModelConfig, TokenModel

MODELS = {"e2d2": E2D2, "ar": AR, "mdlm": MDLM, "bd3lm": BD3LM}  # ModelConfig.model -> class
MODEL_TYPES = tuple(MODELS)


def build_model(cfg: ModelConfig) -> TokenModel:
    """The model that cfg.model names, freshly initialised."""
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {MODEL_TYPES}, got {cfg.model!r}")
    return MODELS[cfg.model](cfg)


def config_from_dict(d: dict) -> ModelConfig:
    """The ModelConfig saved in a checkpoint; keys this code does not know are an error
    (they mean the checkpoint was written by other code)."""
    unknown = sorted(set(d) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ValueError(f"checkpoint config has unknown keys {unknown}")
    return ModelConfig(**d)


def load_checkpoint(path: str, device, need=("config", "model")) -> dict:
    """Read a checkpoint file; ValueError with a clear message if it is missing, is not a
    torch file, or lacks one of the keys in `need` (training also needs optimizer, step)."""
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path} (train one with: python train.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated, or not a torch file at all
        raise ValueError(f"cannot read checkpoint {path} ({e.__class__.__name__}); it is corrupt "
                         f"or not a checkpoint") from None
    missing = sorted(set(need) - set(ckpt if isinstance(ckpt, dict) else ()))
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this project (missing {missing})")
    return ckpt


def model_from_checkpoint(ckpt: dict, device, model_type: str = "") -> TokenModel:
    """Rebuild the model from a checkpoint's config and load its weights (eval mode).
    model_type: if given, the checkpoint must hold that kind of model."""
    saved = ckpt["config"].get("model", "e2d2")
    if model_type and saved != model_type:
        raise ValueError(f"the checkpoint holds a {saved!r} model, not {model_type!r}")
    try:
        model = build_model(config_from_dict(ckpt["config"])).to(device)
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # weights of another shape or name
        raise ValueError(f"the checkpoint does not match this code's models: {e}") from None
    return model.eval()
