"""Self-describing checkpoints: weights + model arguments + the data fingerprint, nothing else needed."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from recserve.errors import ArtifactError
from recserve.models import MODEL_CLASSES, model_args


def save(model: nn.Module, kind: str, path: Path, fingerprint: str, **extra) -> None:
    torch.save({"kind": kind, "model_args": model_args(model), "state_dict": model.state_dict(),
                "fingerprint": fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **extra}, path)


def load(path: Path, expect_fingerprint: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model from its checkpoint alone; refuse one trained on other data."""
    if not Path(path).exists():
        raise ArtifactError(f"{path} is missing: run `recserve train` to create it")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cls, cfg_cls = MODEL_CLASSES[ckpt["kind"]]
    model = cls(cfg_cls(**ckpt["model_args"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    if expect_fingerprint and ckpt["fingerprint"] != expect_fingerprint:
        raise ArtifactError(
            f"{path} was trained on data {ckpt['fingerprint']} but the artifacts hold data {expect_fingerprint}; "
            "retrain with `recserve train` so every model comes from the same data")
    return model, ckpt
