"""Tests of `fastai_cds.architectures`: `small_cnn`'s stages (as `find_stages` sees them), torchvision architectures by name
(`get_arch` and its messages), the CIFAR stem of ResNets, and the paper's CIFAR networks by name (`cifar_model`): their
stems, stages, sizes, a CDS step and a plain export that loads without fastai_cds."""
import json
import pickle
import sys
import textwrap
import warnings

import cloudpickle
import pytest
import torch
import torch.nn as nn
import torchvision
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed

from fastai_cds.architectures import CIFAR_ARCHS, ShuffleUnit, cifar_model, cifar_resnet, cifar_stem, get_arch, shufflenet_v1, small_cnn
from fastai_cds.cds import CDSCallback
from fastai_cds.model import DeepSupervisionModel
from fastai_cds.stages import find_stages

from helpers import BLOCKED, hooked_modules, no_bar, ours, run_children, small_dls


def x_of(n_in=1, size=16, bs=2):
    return torch.randn(bs, n_in, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('n_in,width', [(1, 8), (3, 4)])
def test_small_cnn_four_stages_of_widths_1_2_4_8(n_in, width):
    "Four conv stages of width x (1, 2, 4, 8), stride 2 from the second: the stages end at /1, /2, /4, /8"
    m = small_cnn(n_in, n_out=7, width=width)
    x = x_of(n_in)
    stages, final = find_stages(m, x)
    assert [s.channels for s in stages] == [width * k for k in (1, 2, 4, 8)]
    assert [s.reduction for s in stages] == [1, 2, 4, 8]
    assert [s.size for s in stages] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert final == stages[-1]
    # each stage is the module whose output is that map: check it against the layers run one by one
    outs, h = {}, x
    m.eval()
    with torch.no_grad():
        for name, layer in m.named_children():
            h = layer(h)
            outs[name] = h
        assert h.shape == (2, 7)
    for s in stages:
        assert outs[s.name].shape[1:] == (s.channels, *s.size), s
    assert type(m[-1]) is nn.Linear and m[-1].in_features == 8 * width


def test_get_arch_returns_torchvision_builders():
    assert get_arch('resnet18') is torchvision.models.resnet18
    assert get_arch('mobilenet_v3_small') is torchvision.models.mobilenet_v3_small


def test_get_arch_names_close_matches():
    with pytest.raises(ValueError, match=r"'resnet19' is not a torchvision classification model; did you mean .*resnet18") as e:
        get_arch('resnet19')
    close = str(e.value).split('did you mean ')[1].rstrip('?').split(', ')
    assert 1 <= len(close) <= 5 and all(c in torchvision.models.list_models(torchvision.models) for c in close)
    with pytest.raises(ValueError, match=r"'efficentnet_b0'.*did you mean efficientnet_b0"): get_arch('efficentnet_b0')
    with pytest.raises(ValueError, match=r"'zzqqxx' is not a torchvision classification model: pick one of .*resnet18"):
        get_arch('zzqqxx')


def test_cifar_resnet_stages_at_32px():
    "The CIFAR stem (3x3 stride-1 conv, no max-pool): the four ResNet stages at /1, /2, /4, /8 of a 32x32 input"
    m = cifar_resnet('resnet18', n_out=100)
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.in_channels, m.conv1.out_channels) == ((3, 3), (1, 1), 3, 64)
    assert isinstance(m.maxpool, nn.Identity) and m.fc.out_features == 100
    x = x_of(3, 32)
    stages, final = find_stages(m, x)
    assert [s.name for s in stages] == ['layer1', 'layer2', 'layer3', 'layer4']
    assert [s.channels for s in stages] == [64, 128, 256, 512]
    assert [s.size for s in stages] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert [s.reduction for s in stages] == [1, 2, 4, 8] and final.name == 'layer4'
    with torch.no_grad(): assert m.eval()(x).shape == (2, 100)
    # a plain torchvision resnet18 downsamples 4x more before layer1
    plain, _ = find_stages(torchvision.models.resnet18(), x)
    assert [s.reduction for s in plain] == [4, 8, 16, 32]


def test_cifar_stem_rejects_other_architectures():
    with pytest.raises(ValueError, match='cifar_stem needs a torchvision ResNet-family model.*VGG'):
        cifar_stem(torchvision.models.vgg11())
    m = torchvision.models.resnet18()
    assert cifar_stem(m) is m


# ---------------------------------------------------------------- the paper's CIFAR networks
# What each network's four stages are on a 32x32 image (module, channels, reduction): the papers' widths, the CIFAR versions'
# strides (a stride-1 stem, no max-pool; MobileNet v1 keeps its four later downsamplings, v2 and the ShuffleNets three)
RESNET = [('layer1', 64, 1), ('layer2', 128, 2), ('layer3', 256, 4), ('layer4', 512, 8)]
BOTTLENECK = [('layer1', 256, 1), ('layer2', 512, 2), ('layer3', 1024, 4), ('layer4', 2048, 8)]
STAGES = {
    'resnet18': RESNET, 'resnet50': BOTTLENECK, 'resnet101': BOTTLENECK, 'resnext50': BOTTLENECK, 'resnext101': BOTTLENECK,
    'wrn50': BOTTLENECK, 'wrn101': BOTTLENECK, 'senet18': RESNET, 'senet50': BOTTLENECK, 'senet101': BOTTLENECK,
    'preactresnet18': [('stages.0', 64, 1), ('stages.1', 128, 2), ('stages.2', 256, 4), ('norm', 512, 8)],
    'preactresnet50': [('stages.0', 256, 1), ('stages.1', 512, 2), ('stages.2', 1024, 4), ('norm', 2048, 8)],
    'mobilenetv1': [('blocks.1', 128, 2), ('blocks.2', 256, 4), ('blocks.3', 512, 8), ('blocks.4', 1024, 16)],
    'mobilenetv2': [('features.3', 24, 1), ('features.6', 32, 2), ('features.13', 96, 4), ('features', 1280, 8)],
    'shufflenetv1': [('stem', 24, 1), ('stage2', 240, 2), ('stage3', 480, 4), ('stage4', 960, 8)],
    'shufflenetv2': [('maxpool', 24, 1), ('stage2', 116, 2), ('stage3', 232, 4), ('conv5', 1024, 8)],  # maxpool: an Identity now
}
SMALL = ['resnet18', 'senet18', 'preactresnet18', 'mobilenetv1', 'mobilenetv2', 'shufflenetv1', 'shufflenetv2']  # CI; the rest: slow
SMOKE = ['mobilenetv2', 'shufflenetv1', 'shufflenetv2']  # trained and exported in CI: torchvision's and ours (no timm to import)
arch_params = lambda names: [n if n in names else pytest.param(n, marks=pytest.mark.slow) for n in CIFAR_ARCHS]


def test_the_names_are_the_papers():
    assert sorted(CIFAR_ARCHS) == sorted(STAGES) and len(CIFAR_ARCHS) == 16


@pytest.mark.parametrize('name', arch_params(SMALL))
def test_cifar_model_stem_stages_and_logits(name):
    "Built at 32x32 with 7 classes: a 3x3 stride-1 first conv, no max-pool, the four stages of the CIFAR version, (B, 7) logits"
    m = cifar_model(name, 7)
    first = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
    assert (first.in_channels, first.kernel_size, first.stride) == (3, (3, 3), (1, 1)), first
    assert not any(isinstance(c, nn.MaxPool2d) for c in m.modules())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    stages, final = find_stages(m, x)
    assert [(s.name, s.channels, s.reduction) for s in stages] == STAGES[name]
    assert final == stages[-1] and final.size == (32 // final.reduction,) * 2
    with torch.no_grad(): out = m.eval()(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_cifar_resnet18_is_the_cifar_one():
    "The CIFAR ResNet-18 of the literature (kuangliu/pytorch-cifar, RepDistiller) has 11,173,962 parameters with 10 classes"
    assert sum(p.numel() for p in cifar_model('resnet18', 10).parameters()) == 11_173_962


@pytest.mark.parametrize('name,canonical', [('MobileNet-V1', 'mobilenetv1'), ('mobilenet_v2', 'mobilenetv2'),
                                            ('ShuffleNet_V1', 'shufflenetv1'), ('SHUFFLENETV2', 'shufflenetv2')])
def test_cifar_model_names_ignore_case_dashes_and_underscores(name, canonical):
    assert repr(cifar_model(name, 3)) == repr(cifar_model(canonical, 3))


def test_cifar_model_unknown_names():
    with pytest.raises(ValueError, match=r"'resnet19' is not one of the paper's CIFAR architectures; did you mean resnet18") as e:
        cifar_model('resnet19')
    assert e.value.args[0].endswith('Choose from ' + ', '.join(CIFAR_ARCHS))
    with pytest.raises(ValueError, match=r"'mobilenetv3'.*did you mean mobilenetv2, mobilenetv1\?"): cifar_model('mobilenetv3')
    with pytest.raises(ValueError, match=r"'vgg16' is not one of the paper's CIFAR architectures\. Choose from resnet18, resnet50"):
        cifar_model('vgg16')


def test_timm_networks_without_timm_name_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'timm', None)  # not installed
    with pytest.raises(ModuleNotFoundError, match=r"timm's seresnet18, which needs timm: pip install timm"): cifar_model('senet18')
    assert isinstance(cifar_model('shufflenetv1', 3), nn.Sequential)  # the others need torchvision only


def test_shufflenet_v1_is_the_papers():
    """ShuffleNet 1x, g=3 (Zhang et al. 2018, Table 1): 4, 8, 4 units of 240, 480, 960 channels; grouped 1x1 convs (but the
    first); a quarter of the output in the bottleneck; depthwise 3x3 convs; the first unit of each stage at stride 2"""
    m = shufflenet_v1(100)
    stages = [m.stage2, m.stage3, m.stage4]
    assert [len(s) for s in stages] == [4, 8, 4]
    for s, w, c_in in zip(stages, (240, 480, 960), (24, 240, 480)):
        assert [u.stride for u in s] == [2, 1, 1, 1] + [1] * (len(s) - 4)
        for k, u in enumerate(s):
            conv1, _, _, shuffle, dw, _, conv3, _ = u.branch
            n_in = c_in if k == 0 else w
            assert (conv1.in_channels, conv1.out_channels, dw.groups, dw.out_channels) == (n_in, w // 4, w // 4, w // 4)
            assert conv1.groups == shuffle.groups == (1 if (w, k) == (240, 0) else 3) and conv3.groups == 3
            assert conv3.out_channels == (w - n_in if k == 0 else w)
    assert m.fc.in_features == 960 and m.fc.out_features == 100
    # the unit: the branch plus the input, or beside the input's average pool
    u, x = m.stage3[1].eval(), torch.randn(2, 480, 8, 8)
    with torch.no_grad(): torch.testing.assert_close(u(x), torch.relu(u.branch(x) + x))
    u, x = m.stage3[0].eval(), torch.randn(2, 240, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(u(x), torch.relu(torch.cat([nn.functional.avg_pool2d(x, 3, 2, 1), u.branch(x)], 1)))
    # initialised as the reference: conv weights of std sqrt(2 / fan-out), BatchNorm 1 and 0
    w = m.stage4[1].branch[6].weight  # 1x1, 240 -> 960 in 3 groups: fan-out 960
    assert abs(w.std().item() - (2 / 960) ** 0.5) < 0.05 * (2 / 960) ** 0.5
    assert all(bn.weight.eq(1).all() and bn.bias.eq(0).all() for bn in m.modules() if isinstance(bn, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="stride 1 needs n_in == n_out"): ShuffleUnit(24, 240)
    with pytest.raises(ValueError, match="groups must be one of"): shufflenet_v1(groups=5)


def test_shuffle_unit_pickles_by_value(tmp_path):
    "cloudpickle carries our unit's class inside the pickle (fastai's export pickles with it): no import of fastai_cds to load it"
    u = ShuffleUnit(24, 48, stride=2, first_groups=1).eval()
    (tmp_path / 'u.pkl').write_bytes(cloudpickle.dumps(u))
    assert ours(tmp_path / 'u.pkl') == []
    again = pickle.loads((tmp_path / 'u.pkl').read_bytes())
    x = torch.randn(2, 24, 8, 8)
    with torch.no_grad(): torch.testing.assert_close(again(x), u(x))


def train_and_export(name, fname):
    """`cifar_model(name)` trained one epoch (two steps) with CDSCallback() on digits at 32x32: four heads on the expected stages,
    four contrastive terms each step; exported to `fname`. The batch, the plain model's predictions on it, its state_dict keys"""
    dls = small_dls(n_train=10, n_valid=4, size=32, n_channels=3, bs=4)
    set_seed(0)
    model = cifar_model(name, dls.c)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learn = no_bar(Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, 1e-3)
    ds = learn.model
    assert isinstance(ds, DeepSupervisionModel) and ds.stages == [n for n, _, _ in STAGES[name]] and len(ds.heads) == 4
    assert all(len(learn.loss_terms.history[f"contra_{i}"]) == 2 for i in range(4))
    plain = ds.model.eval()
    assert plain is model and any(not torch.equal(before[k], v) for k, v in plain.state_dict().items())  # it trained
    x = dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    with torch.no_grad(): pred = plain(x)
    learn.export(fname)
    assert not hooked_modules(plain)
    return x, pred, list(plain.state_dict())


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    "The exports of this module's smoke runs, made once each: name -> (file, batch, predictions, state_dict keys)"
    d, done = tmp_path_factory.mktemp('archs'), {}
    def get(name):
        if name not in done: done[name] = (d / f'{name}.pkl', *train_and_export(name, d / f'{name}.pkl'))
        return done[name]
    return get


@pytest.mark.parametrize('name', arch_params(SMOKE))
def test_cifar_model_trains_with_cds_and_exports_the_plain_model(name, exports):
    fname, x, pred, keys = exports(name)
    assert ours(fname) == []  # loading it imports nothing of fastai_cds
    m = load_learner(fname).model.eval()
    assert list(m.state_dict()) == keys and not hooked_modules(m)
    with torch.no_grad(): torch.testing.assert_close(m(x), pred)


CHILD = BLOCKED + textwrap.dedent("""
    x, res, out = torch.load(f'{d}/x.pt'), {'blocked': blocked}, {}
    for name in sys.argv[2:]:
        m = load_learner(f'{d}/{name}.pkl').model.eval()
        with torch.no_grad(): out[name] = m(x[name])
        res[name] = list(m.state_dict())
    res['loaded_cds_modules'] = [k for k, v in sys.modules.items() if k.startswith('fastai_cds') and v is not None]
    torch.save(out, f'{d}/out.pt')
    json.dump(res, open(f'{d}/res.json', 'w'))
""")


@pytest.mark.parametrize('names', [SMOKE, pytest.param([n for n in CIFAR_ARCHS if n not in SMOKE], marks=pytest.mark.slow)],
                         ids=['ci', 'rest'])
def test_exports_load_without_fastai_cds(names, exports):
    "The exports load in one fresh process where fastai_cds cannot be imported: the same keys and predictions"
    done = {n: exports(n) for n in names}
    d = done[names[0]][0].parent
    torch.save({n: v[1] for n, v in done.items()}, d / 'x.pt')
    run_children((CHILD, d, *names))
    res, out = json.load(open(d / 'res.json')), torch.load(d / 'out.pt')
    assert res['blocked'] and res['loaded_cds_modules'] == []
    for n in names:
        assert res[n] == done[n][3]
        torch.testing.assert_close(out[n], done[n][2])
