"""Models by timm name; optional pretrained weights from a local file (never downloaded).

Importing this module also registers `resnet18_dense` with timm (DenseResNet18): a ResNet-18 with a dense
delamination head, built by name like any timm model (trial.model, bundles, export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
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


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d that computes a small output map (at most MAX_PIXELS pixels) as one matrix product over its
    unfolded input patches (im2col); larger maps, groups, non-zero padding modes keep nn.Conv2d's own path.

    Why: on CPUs, oneDNN's convolution kernels are slow for the 4 x 4 maps of ResNet-18's layer4 at 100-128 px.
    One 512 -> 512 3x3 convolution on a (16, 512, 4, 4) batch, forward and backward, 1 thread (README, "Speed"):
    74 -> 38 ms in bf16 (AVX512-BF16), 91 -> 51 ms in fp32, 110 -> 49 ms under the AVX2 imitation; at 7 x 7 the
    native kernel is as fast or faster, so the matmul is taken only up to 16 output pixels. The parameters, their
    names and the arithmetic are nn.Conv2d's (same results to rounding), so a model trained with it is saved,
    loaded, exported and explained like any other; pqfn.trial swaps it in on CPU (trial.small_maps)."""

    MAX_PIXELS = 16

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str) or x.dim() != 4:
            return super()._conv_forward(x, weight, bias)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh * ow > self.MAX_PIXELS:
            return super()._conv_forward(x, weight, bias)
        cols = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))  # (B, C_in * kh * kw, oh * ow)
        out = torch.matmul(cols.transpose(1, 2), weight.flatten(1).t())  # (B, oh * ow, C_out)
        if bias is not None:
            out = out + bias.to(out.dtype)  # under autocast the product is bf16, as nn.Conv2d's output would be
        return out.view(x.shape[0], oh, ow, self.out_channels).permute(0, 3, 1, 2)  # (B, C_out, oh, ow), channels-last strides


def matmul_small_maps(model: nn.Module) -> int:
    """Turn every plain nn.Conv2d of `model` into a SmallMapConv2d in place (the same module, parameters and
    state-dict keys); returns how many. A model so changed computes what it did, to rounding."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = SmallMapConv2d
            n += 1
    return n


DENSE_MODEL = "resnet18_dense"


class DenseResNet18(ResNet):
    """A timm ResNet-18 (every stage, its pooled classifier) with a dense delamination head beside it.

    Why: a bond-pad delamination is a few pixels at one of 28 lead tips. The pooled classifier averages it
    away over the whole map and, from one label per image and a CPU's hundred optimizer steps, does not learn
    it (README, "Is the CNN worth it?"). The dense head is a 1x1 convolution on the stride-8 features (layer2,
    12 x 12 cells at 96 px) giving, per cell, a logit for "die pad delaminated here" and one for "bond pad
    delaminated here". Its maximum over the cells is the scan's finding logit (a patch anywhere counts in
    full), and the two findings make four class log-probabilities (A = die pad and not bond pad, B, C, D),
    which are added to the classifier's logits: the model's output is still (B, 4) logits, so ensembles, the
    prior correction, Grad-CAM and ONNX export see an ordinary classifier.

    With trial.mask_loss > 0 the cells are also trained on the true masks (dense_loss); without masks the
    head still learns from the class loss alone, through its maximum.
    """

    # Positive cells weigh more in the mask loss: a die-pad patch covers a few cells, a bond-pad patch about
    # a tenth of that (3 and 30 for the bond pad measured the same: README, "Quickstart", levers).
    POS_WEIGHT = (2.0, 10.0)
    STRIDE8_CHANNELS = 128  # ResNet-18's layer2
    STRIDE = 8  # of that stage: cell i looks at input pixel 8 x i
    pos_weight: torch.Tensor
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def __init__(self, **kwargs: Any):
        super().__init__(block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)  # type: ignore[arg-type]  # timm's hint wants an instance
        self.dense = nn.Conv2d(self.STRIDE8_CHANNELS, 2, kernel_size=1)
        self._cells: torch.Tensor | None = None  # the latest training forward's dense logits (dense_loss)
        # on the model's device from the start: no host-to-device copy per step on a GPU
        self.register_buffer("pos_weight", torch.tensor(self.POS_WEIGHT).view(1, 2, 1, 1), persistent=False)
        self.default_cfg = self.pretrained_cfg = {"first_conv": "conv1", "classifier": "fc"}

    def _stride8(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.maxpool(self.act1(self.bn1(self.conv1(x))))))

    def cell_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, h, w) the dense head's logits per cell (die pad, bond pad delaminated there), nothing else run."""
        return self.dense(self._stride8(x))  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f8 = self._stride8(x)
        logits = self.forward_head(self.layer4(self.layer3(f8)))
        cells = self.dense(f8)  # (B, 2, h, w): die pad, bond pad
        if self.training:
            self._cells = cells
        return logits.float() + findings_log_probs(cells.float().amax(dim=(2, 3)))

    def dense_loss(self, masks: torch.Tensor) -> torch.Tensor:
        """masks (B, 2, r, r) float 0/1 (die pad, bond pad) of the batch just seen in training -> the mean
        class-weighted binary cross-entropy of the cells (a cell is positive when any pixel of its window, centred
        on where the cell looks, is)."""
        if self._cells is None:
            raise RuntimeError("dense_loss before a training forward pass")
        cells, self._cells = self._cells.float(), None
        target = cell_targets(masks.float(), cells.shape[-1], self.STRIDE)
        return F.binary_cross_entropy_with_logits(cells, target, pos_weight=self.pos_weight)


def cell_targets(masks: torch.Tensor, cells: int, stride: int) -> torch.Tensor:
    """masks (B, C, r, r) float 0/1 -> (B, C, cells, cells): cell i is positive where any pixel of its window
    stride x i - stride / 2 .. stride x i + stride / 2 - 1 is, the window centred on pixel stride x i, where a
    cell of a ResNet whose strided layers pad "same" looks (pqfn.explain.cell_offset), at any resolution (at
    100 px a stride-8 stage has 13 cells: r / cells would not be the stride). The pixels past the last window
    (the bottom and right edge) count for the last cell."""
    r, h, n = masks.shape[-1], stride // 2, cells
    extra = stride * (n + 1) - r - h  # pad to n + 1 whole windows
    pooled = F.max_pool2d(F.pad(masks, (h, extra, h, extra)), stride, stride)  # (B, C, n + 1, n + 1)
    rows = torch.cat([pooled[..., : n - 1, :], pooled[..., n - 1 :, :].amax(-2, keepdim=True)], -2)
    return torch.cat([rows[..., : n - 1], rows[..., n - 1 :].amax(-1, keepdim=True)], -1)


def findings_log_probs(z: torch.Tensor) -> torch.Tensor:
    """(B, 2) logits of the two findings (die pad, bond pad delaminated) -> (B, 4) log-probabilities of the
    classes A (die pad only), B (bond pad only), C (both), D (none), the findings taken as independent."""
    yes, no = F.logsigmoid(z), F.logsigmoid(-z)
    return torch.stack([yes[:, 0] + no[:, 1], no[:, 0] + yes[:, 1], yes[:, 0] + yes[:, 1], no[:, 0] + no[:, 1]], 1)


@register_model
def resnet18_dense(pretrained: bool = False, **kwargs: Any) -> DenseResNet18:
    """timm entry point of DenseResNet18 (weights, if any, come through pqfn.model.build_model's file)."""
    if pretrained:
        raise TrialError(f"{DENSE_MODEL}: no downloadable weights; set trial.pretrained to a local file")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's hub settings: nothing to fetch
        kwargs.pop(key, None)
    return DenseResNet18(**kwargs)


def check_mask_loss(model_name: str, mask_loss: float) -> None:
    """trial.mask_loss trains a dense head: only a model that has one can take it."""
    if mask_loss > 0 and model_name != DENSE_MODEL:
        raise TrialError(f"trial.mask_loss={mask_loss} needs trial.model={DENSE_MODEL} (the model with a dense "
                         f"delamination head); trial.model is {model_name} (set trial.mask_loss=0)")
