"""Tests of `fastai_cds.stages`: stage discovery on torchvision/timm/custom CNNs, checked against a real forward of
`DeepSupervisionModel` (the stage outputs it records keep the graph); `module_mode`."""
import copy
import functools
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from fastai.vision.learner import create_vision_model

from fastai_cds.model import DeepSupervisionModel
from fastai_cds.stages import StageInfo, find_stages, module_mode

from helpers import hooked_modules

IN = 64  # probe resolution: keeps every arch fast on CPU


@pytest.fixture
def x():
    return torch.randn(2, 3, IN, IN, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def _vision_model(arch, n_out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained` deprecation
        return create_vision_model(getattr(torchvision.models, arch), n_out, pretrained=False)


def vision_model(arch, n_out=10):
    "A fresh copy (weight init is the slow part, so each arch is built once)"
    return copy.deepcopy(_vision_model(arch, n_out))


def assert_no_hooks(model):
    left = hooked_modules(model)
    assert not left, f"hooks left on {left}"


def check_against_forward(model, x, stages):
    "One armed training forward of `model` wrapped with identity heads on `stages`: the recorded maps match them and keep the graph"
    model.train()
    xg = x.clone().requires_grad_()
    ds = DeepSupervisionModel(model, nn.ModuleList([nn.Identity() for _ in stages]), [s.name for s in stages])
    ds.arm()
    ds(xg)
    taps = ds.read()
    outs = list(taps.stages)
    assert_no_hooks(model)
    assert len(outs) == len(stages)
    assert all(h is o for h, o in zip(taps.heads, outs))  # identity heads: the heads saw the stage outputs
    for s, o in zip(stages, outs):
        assert isinstance(o, torch.Tensor) and o.ndim == 4, s
        assert o.shape[0] == x.shape[0]
        assert o.shape[1] == s.channels, s
        assert tuple(o.shape[-2:]) == tuple(s.size), s
        assert s.reduction == IN // o.shape[-2], s
        assert o.requires_grad and o.grad_fn is not None, f"{s.name}: graph not kept"
    # the graph really reaches the input (one backward through the shallowest map: cheap)
    (g,) = torch.autograd.grad(outs[0].float().sum(), xg)
    assert g.abs().sum() > 0
    return outs


# ---------------------------------------------------------------- torchvision through fastai
ARCHS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v3_small",
         "efficientnet_b0", "densenet121", "convnext_tiny", "regnet_y_400mf", "vgg11_bn"]


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_archs(arch, x):
    model = vision_model(arch) if arch == "resnet18" else _vision_model.__wrapped__(arch, 10)
    stages, final = find_stages(model, x)
    assert_no_hooks(model)

    assert len(stages) == 4
    assert all(isinstance(s, StageInfo) for s in stages)
    assert [s.reduction for s in stages] == [4, 8, 16, 32]
    sizes = [s.size[0] for s in stages]
    assert sizes == [16, 8, 4, 2] and all(s.size[0] == s.size[1] for s in stages)
    assert len({s.name for s in stages}) == 4
    assert final == stages[-1]
    # the final map is the output of the body (fastai's cut, module '0'), checked against a real
    # forward in `check_against_forward`
    assert final.name == "0"
    # every stage lives inside the body, not in the head
    for s in stages:
        assert s.name == "0" or s.name.startswith("0."), s
        model.get_submodule(s.name)
    check_against_forward(model, x, stages)


def test_resnet18_vision_model_names(x):
    stages, final = find_stages(vision_model("resnet18"), x)
    assert [s.name for s in stages] == ["0.4", "0.5", "0.6", "0"]
    assert [s.channels for s in stages] == [64, 128, 256, 512]
    assert [s.size for s in stages] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert final.name == "0" and final.channels == 512


def test_raw_torchvision_resnet18(x):
    model = torchvision.models.resnet18(weights=None)
    stages, final = find_stages(model, x)
    assert [s.name for s in stages] == ["layer1", "layer2", "layer3", "layer4"]
    assert [s.channels for s in stages] == [64, 128, 256, 512]
    assert [s.reduction for s in stages] == [4, 8, 16, 32]
    assert final.name == "layer4"
    assert_no_hooks(model)
    check_against_forward(model, x, stages)


# ---------------------------------------------------------------- custom CNNs
def flat_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),               # 0 1 2   /1
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),   # 3 4 5   /2
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),  # 6 7 8   /4
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),                                # 9 10    /4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))                  # 11 12 13


def block(ci, co, stride, extra=False):
    layers = [nn.Conv2d(ci, co, 3, stride=stride, padding=1), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]
    if extra: layers += [nn.Conv2d(co, co, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def nested_cnn():
    return nn.Sequential(
        block(3, 8, 1), block(8, 16, 2), block(16, 24, 2, extra=True),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)))


def test_custom_flat_cnn(x):
    model = flat_cnn()
    stages, final = find_stages(model, x)
    # the map before each stride-2 conv, then the last conv block's output (before the global pool)
    assert [s.name for s in stages] == ["2", "5", "10"]
    assert [s.channels for s in stages] == [8, 16, 32]
    assert [s.size for s in stages] == [(64, 64), (32, 32), (16, 16)]
    assert [s.reduction for s in stages] == [1, 2, 4]
    assert final == stages[-1]
    check_against_forward(model, x, stages)


def test_non_square_input():
    # sizes are (h, w); the reduction is measured on the height
    stages, _ = find_stages(flat_cnn(), torch.randn(2, 3, 64, 32))
    assert [s.size for s in stages] == [(64, 32), (32, 16), (16, 8)]
    assert [s.reduction for s in stages] == [1, 2, 4]


def test_custom_flat_cnn_max_stages(x):
    stages, final = find_stages(flat_cnn(), x, max_stages=2)
    assert [s.name for s in stages] == ["5", "10"] and final.name == "10"


def test_custom_nested_cnn(x):
    model = nested_cnn()
    stages, final = find_stages(model, x)
    # the outermost module returning each map is the block itself
    assert [s.name for s in stages] == ["0", "1", "2"]
    assert [s.channels for s in stages] == [8, 16, 24]
    assert [s.reduction for s in stages] == [1, 2, 4]
    assert final.name == "2"
    check_against_forward(model, x, stages)


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims
    def forward(self, x): return x.permute(*self.dims)


def test_channels_last_chain_read_by_shape(x):
    "A hand-written model that goes channels-last: its (B, H, W, C) maps are told by shape and reach the heads as NCHW"
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Permute(0, 2, 3, 1), nn.LayerNorm(8), Permute(0, 3, 1, 2),
                          nn.Conv2d(8, 16, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    stages, final = find_stages(model, x, scheme="uniform", max_stages=5)
    assert [(s.name, s.layout, s.channels, s.size) for s in stages] == [
        ("0", "NCHW", 8, (32, 32)), ("1", "NHWC", 8, (32, 32)), ("2", "NHWC", 8, (32, 32)), ("3", "NCHW", 8, (32, 32)),
        ("4", "NCHW", 16, (16, 16))]
    ds = DeepSupervisionModel(model, nn.ModuleList([nn.Identity() for _ in stages]), stages).eval()
    ds.arm()
    with torch.no_grad(): ds(x)
    maps = ds.read().stages
    with torch.no_grad(): conv = model[0](x)
    assert torch.equal(maps[1], conv) and maps[1].shape == (2, 8, 32, 32)
    assert torch.equal(maps[2], maps[3])  # the LayerNorm's channels-last output, permuted: the next module's input
    # named, with the layout said: the same; said wrongly where the shape cannot be read so: an error naming the fix
    assert find_stages(model, x, layers=[("1", "NHWC")])[0] == [stages[1]]
    with pytest.raises(ValueError, match=r"cannot tell how the output of '1' \(2, 32, 32, 8\).*\('1', 'NHWC'\)"):
        find_stages(model, x, layers=[("1", "tokens")])


# ---------------------------------------------------------------- timm
def timm_model(arch):
    pytest.importorskip("timm")
    from fastai.vision.learner import create_timm_model
    return create_timm_model(arch, 10, pretrained=False)[0]


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_timm_models(arch, x):
    model = timm_model(arch)
    stages, final = find_stages(model, x)
    assert_no_hooks(model)
    assert len(stages) == 4
    assert [s.reduction for s in stages] == [4, 8, 16, 32]
    assert final == stages[-1]
    # independent expectation: timm's own feature_info
    fi = model[0].model.feature_info
    fi = [dict(num_chs=c, reduction=r, module=n) for c, r, n in
          zip(fi.channels(), fi.reduction(), fi.module_name())] if hasattr(fi, "channels") else list(fi)
    assert [s.channels for s in stages] == [d["num_chs"] for d in fi[-4:]]
    assert [s.reduction for s in stages] == [d["reduction"] for d in fi[-4:]]
    assert [s.name for s in stages] == ["0.model." + d["module"] for d in fi[-4:]]
    if arch == "resnet18":
        for s, k in zip(stages, range(1, 5)):
            assert f"layer{k}" in s.name
    check_against_forward(model, x, stages)


# ---------------------------------------------------------------- layers= and scheme=
def test_explicit_layers(x):
    model = vision_model("resnet18")
    stages, final = find_stages(model, x, layers=["0.5", -1])
    assert [s.name for s in stages] == ["0.5", "0"]
    assert [(s.channels, s.size, s.reduction) for s in stages] == [(128, (8, 8), 8), (512, (2, 2), 32)]
    assert final.name == "0"
    # ints index the whole list of downsampling stages (what max_stages trims), negative from the end
    every, _ = find_stages(model, x, max_stages=99)
    assert [s.name for s in every] == ["0.2", "0.4", "0.5", "0.6", "0"]
    assert [s.reduction for s in every] == [2, 4, 8, 16, 32]
    st, _ = find_stages(model, x, layers=[0, 1, -2])
    assert st == [every[0], every[1], every[3]]
    # a name not among the automatic stages is fine as long as it returns a 4-D map
    st, _ = find_stages(model, x, layers=["0.4.0.conv1"])
    assert (st[0].channels, st[0].size) == (64, (16, 16))
    assert_no_hooks(model)
    check_against_forward(model, x, stages)


def test_uniform_scheme(x):
    model = vision_model("resnet18")
    stages, final = find_stages(model, x, scheme="uniform", max_stages=3)
    assert len(stages) == 3
    assert stages[-1] == final
    assert len({s.name for s in stages}) == 3
    r = [s.reduction for s in stages]
    assert r == sorted(r)
    check_against_forward(model, x, stages)


def test_uniform_scheme_flat_cnn(x):
    # chain: modules 0..10 (11 elements); picks round((k+1)*11/3)-1 = 3, 6, 10
    stages, final = find_stages(flat_cnn(), x, scheme="uniform", max_stages=3)
    assert [s.name for s in stages] == ["3", "6", "10"]
    assert [s.reduction for s in stages] == [2, 4, 4]
    assert stages[-1] == final


# ---------------------------------------------------------------- errors
def test_unknown_name_lists_stages(x):
    with pytest.raises(ValueError, match="nope") as ei:
        find_stages(vision_model("resnet18"), x, layers=["nope"])
    msg = str(ei.value)
    for n in ["0.4", "0.5", "0.6", "0"]:
        assert repr(n) in msg, msg


def test_non_map_name(x):
    # '1.2' is fastai's head Flatten: exists, but returns no 4-D map
    with pytest.raises(ValueError, match=r"4-D feature map.*Stages found"):
        find_stages(vision_model("resnet18"), x, layers=["1.2"])


def test_index_out_of_range(x):
    model = vision_model("resnet18")
    with pytest.raises(IndexError, match="99"):
        find_stages(model, x, layers=[99])
    with pytest.raises(IndexError, match="5 stages"):  # 0.2, 0.4, 0.5, 0.6, 0
        find_stages(model, x, layers=[-6])
    with pytest.raises(IndexError):
        find_stages(model, x, layers=[5])
    assert_no_hooks(model)


def test_bad_layer_type(x):
    with pytest.raises(TypeError):
        find_stages(flat_cnn(), x, layers=[1.5])


def test_no_feature_maps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="no chain of 4-D"):
        find_stages(model, torch.randn(2, 3, 2, 2))
    assert_no_hooks(model)


@pytest.mark.parametrize("kw,match", [(dict(scheme="random"), "scheme"), (dict(scheme="Uniform"), "scheme"),
                                      (dict(max_stages=0), "max_stages")])
def test_bad_options(x, kw, match):
    with pytest.raises(ValueError, match=match):
        find_stages(flat_cnn(), x, **kw)


# ---------------------------------------------------------------- side effects
@pytest.mark.parametrize("train", [True, False])
def test_no_side_effects(x, train):
    model = vision_model("resnet18")
    model.train(train)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    params = [p.detach().clone() for p in model.parameters()]
    find_stages(model, x)
    find_stages(model, x, scheme="uniform")
    assert model.training is train
    assert all(m.training is train for m in model.modules())
    for m, (rm, rv, nb) in zip(bns, before):
        assert torch.equal(m.running_mean, rm) and torch.equal(m.running_var, rv)
        assert torch.equal(m.num_batches_tracked, nb)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None for p in model.parameters())
    assert_no_hooks(model)


def test_no_side_effects_timm(x):
    model = timm_model("resnet18")
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    rm = bn.running_mean.clone()
    find_stages(model, x)
    assert model.training and torch.equal(bn.running_mean, rm)
    assert_no_hooks(model)


def test_mixed_train_eval_modes_preserved(x):
    model = vision_model("resnet18")
    model.train()
    frozen = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)][:3]
    for n in frozen: model.get_submodule(n).eval()
    modes = {n: m.training for n, m in model.named_modules()}
    find_stages(model, x)
    changed = [n for n, m in model.named_modules() if m.training != modes[n]]
    assert not changed, f"training flag changed on {changed}"


def test_module_mode_sets_and_restores_every_module(x):
    "Every module in the asked mode inside the block; each one's own mode back on exit, after an exception too"
    model = flat_cnn().train()
    model[1].eval()  # a frozen BatchNorm
    modes = [m.training for m in model.modules()]
    with module_mode(model) as m:
        assert m is model and not any(k.training for k in model.modules())
    assert [m.training for m in model.modules()] == modes
    model.eval()
    modes = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with module_mode(model, training=True):
            assert all(k.training for k in model.modules())
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == modes


def test_stage_info_repr():
    assert repr(StageInfo("0.4", 64, (16, 16), 4)) == "0.4: 64x16x16 (/4)"
    assert re.fullmatch(r"\S+: \d+x\d+x\d+ \(/\d+\)", repr(StageInfo("a.b", 1, (2, 3), 5)))
