"""Tests of `fastai_cds.architectures`: `small_cnn`'s stages (as `find_stages` sees them), torchvision architectures by name
(`get_arch` and its messages), the CIFAR stem of ResNets."""
import pytest
import torch
import torch.nn as nn
import torchvision

from fastai_cds.architectures import cifar_resnet, cifar_stem, get_arch, small_cnn
from fastai_cds.stages import find_stages


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
