"""Models by timm name; optional pretrained weights from a local file (never downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pqfn.config import CLASSES
from pqfn.errors import TrialError


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0][:6]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise TrialError(f"trial.model: {name!r} is not a timm model name{hint}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    sd: Any
    if not path.is_file():
        raise TrialError(f"trial.pretrained: {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the user's file
        raise TrialError(f"trial.pretrained: cannot read weights from {path} ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TrialError(f"trial.pretrained: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def build_model(name: str, pretrained: Path | None = None, num_classes: int = len(CLASSES)) -> nn.Module:
    """timm model with one input channel and `num_classes` outputs.

    Pretrained weights: RGB first-layer weights are summed to one channel (timm's adapt_input_conv);
    a classifier of another size is left freshly initialised; any other shape mismatch is an error.
    """
    check_model_name(name)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=1)
    if pretrained is None:
        return model
    sd = _read_weights(pretrained)
    own = model.state_dict()
    meta: dict[str, Any] = dict(getattr(model, "default_cfg", {}) or {})
    first, head = meta.get("first_conv"), meta.get("classifier")
    unknown = [k for k in sd if k not in own]
    if unknown:
        raise TrialError(f"trial.pretrained: {pretrained} has {len(unknown)} key(s) that {name} lacks, e.g. {unknown[0]!r}")
    load = {}
    for k, v in sd.items():
        if first and k == f"{first}.weight" and v.shape != own[k].shape and v.dim() == 4:
            v = timm.models.adapt_input_conv(1, v)
        if v.shape != own[k].shape:
            if head and k.startswith(head + "."):
                continue  # classifier for another number of classes: keep the fresh 4-class head
            raise TrialError(
                f"trial.pretrained: {pretrained}: {k} has shape {tuple(v.shape)} but {name} expects {tuple(own[k].shape)}"
            )
        load[k] = v
    model.load_state_dict(load, strict=False)
    return model
