"""SmallMapConv2d (trial.small_maps): the same convolution as nn.Conv2d, computed as a matrix product on small maps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pqfn.config import TrialConfig
from pqfn.data import Dataset
from pqfn.model import SmallMapConv2d, build_model, matmul_small_maps
from pqfn.splits import split_test
from pqfn.trial import CrossValidation, use_small_map_matmul


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "pad", "dil", "size", "bias"), [
    (512, 512, 3, 1, 1, 1, 4, False),  # ResNet-18 layer4 at 100-128 px
    (256, 512, 3, 2, 1, 1, 7, False),  # layer4's first, strided convolution
    (256, 512, 1, 2, 0, 1, 7, False),  # its 1x1 shortcut
    (8, 6, 3, 1, 2, 2, 3, True),  # dilation and a bias
    (5, 7, (3, 1), (2, 1), (1, 0), 1, 5, True),  # non-square kernel, stride and padding (output 3 x 5)
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_matmul_path_computes_the_convolution_and_its_gradients(cin: int, cout: int, k: int | tuple[int, int],
                                                                    stride: int | tuple[int, int],
                                                                    pad: int | tuple[int, int], dil: int, size: int,
                                                                    bias: bool, channels_last: bool) -> None:
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, k, stride, pad, dil, bias=bias).double()
    mine = nn.Conv2d(cin, cout, k, stride, pad, dil, bias=bias).double()
    mine.load_state_dict(ref.state_dict())
    assert matmul_small_maps(mine) == 1 and type(mine) is SmallMapConv2d
    x = torch.randn(3, cin, size, size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ref(xa)
    unfolds = []
    real_unfold = F.unfold

    def counted(*a: Any, **k: Any) -> torch.Tensor:
        unfolds.append(1)
        return real_unfold(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "unfold", counted)
        yb = mine(xb)
    assert unfolds == [1] and ya.shape == yb.shape  # the matmul path ran, once
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert xa.grad is not None and xb.grad is not None
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    if bias:
        assert mine.bias is not None and ref.bias is not None
        torch.testing.assert_close(mine.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)


def test_under_autocast_and_for_an_empty_batch_it_answers_as_nn_conv2d() -> None:
    torch.manual_seed(0)
    ref = nn.Conv2d(8, 6, 1, bias=True)
    mine = nn.Conv2d(8, 6, 1, bias=True)
    mine.load_state_dict(ref.state_dict())
    matmul_small_maps(mine)
    x = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x), mine(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding
    assert mine(torch.randn(0, 8, 4, 4)).shape == ref(torch.randn(0, 8, 4, 4)).shape == (0, 6, 4, 4)


def test_larger_maps_and_grouped_convolutions_keep_the_native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_unfold(*a: object, **k: object) -> torch.Tensor:
        raise AssertionError("the matmul path ran")

    big, grouped = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=2)
    matmul_small_maps(big)
    matmul_small_maps(grouped)
    monkeypatch.setattr(F, "unfold", no_unfold)
    assert big(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)  # 25 output pixels > 16
    assert grouped(torch.randn(1, 4, 3, 3)).shape == (1, 4, 3, 3)


@pytest.mark.parametrize("name", ["resnet18", "resnet18_dense"])
def test_a_swapped_model_keeps_its_weights_and_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        assert matmul_small_maps(model) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    fresh = build_model(name)
    fresh.load_state_dict(after)  # a saved swapped model loads into a plain one
    assert all(type(m) is not SmallMapConv2d for m in fresh.modules())


def test_the_trial_swaps_on_cpu_only_as_configured(tiny_ds: Dataset) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_small_map_matmul(TrialConfig(), cpu) and not use_small_map_matmul(TrialConfig(), cuda)
    assert not use_small_map_matmul(TrialConfig(small_maps="native"), cpu)
    assert use_small_map_matmul(TrialConfig(small_maps="matmul"), cuda)
    pool = split_test(tiny_ds, 0.2, seed=0).pool
    base = dict(model="test_resnet", resolution=32, folds=2, epochs=1, data_size=40, batch_size=8, max_copies=10,
                device="cpu")
    for setting, swapped in (("auto", True), ("native", False)):
        cv = CrossValidation(TrialConfig(**(base | {"small_maps": setting})), tiny_ds, pool)
        kinds = {type(m) for ln in cv.learners for m in ln.model.modules() if isinstance(m, nn.Conv2d)}
        assert kinds == ({SmallMapConv2d} if swapped else {nn.Conv2d}), setting
