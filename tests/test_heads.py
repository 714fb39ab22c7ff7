"""Tests of `fastai_cds.heads`: projection heads (`SepConvHead`, `MLPHead`, by name through `head_factory`) and auxiliary
classifiers sized from the stages."""
from functools import partial

import pytest
import torch
import torch.nn as nn

from fastai_cds.heads import (HEADS, AuxClassifier, ConvTrunk, L2Norm, MLPHead, SepConvHead,
                              conv_trunk, head_factory, sep_conv_block)
from fastai_cds.stages import StageInfo

BS = 3


def stage(c, s, red=1, name="s"):
    return StageInfo(name, c, (s, s), red)


FINAL = stage(512, 2, 16, "final")


def convs(m, **kw):
    return [c for c in m.modules() if isinstance(c, nn.Conv2d) and all(getattr(c, k) == v for k, v in kw.items())]


def pointwise_out_channels(m):
    "Output width of every sep-conv block: the last 1x1 conv of each block"
    return [blk[5].out_channels for blk in m[0]]


def assert_unit_norm(z):
    torch.testing.assert_close(z.norm(dim=1), torch.ones(z.shape[0]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- sep-conv projection head
def test_sepconv_head_three_blocks_to_final():
    st = stage(64, 16, 2)
    head = SepConvHead(st, FINAL)
    trunk = head[0]
    assert len(trunk) == 3, "16x16 -> 2x2 is three stride-2 blocks"
    assert pointwise_out_channels(head) == [128, 256, 512]
    # every block halves the resolution: its first (depthwise) conv has stride 2
    assert [blk[0].stride for blk in trunk] == [(2, 2)] * 3
    assert [blk[0].groups for blk in trunk] == [64, 128, 256]
    x = torch.randn(BS, 64, 16, 16)
    sizes = []
    h = x
    for blk in trunk:
        h = blk(h)
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(128, 8, 8), (256, 4, 4), (512, 2, 2)]
    head.train()
    z = head(x)
    assert z.shape == (BS, 512)
    assert_unit_norm(z)
    head.eval()
    with torch.no_grad():
        assert_unit_norm(head(x))
    assert isinstance(head[-1], L2Norm)


def test_final_stage_head_has_no_conv():
    head = SepConvHead(FINAL, FINAL)
    assert not convs(head), "the final stage already has the final width and size"
    assert sum(p.numel() for p in head.parameters()) == 0
    x = torch.randn(BS, 512, 2, 2)
    z = head(x)
    assert z.shape == (BS, 512)
    assert_unit_norm(z)
    # exactly: global average pool then L2-normalise
    ref = x.mean((2, 3))
    torch.testing.assert_close(z, ref / ref.norm(dim=1, keepdim=True))


def test_same_size_other_width_one_stride1_block():
    head = SepConvHead(stage(256, 2, 16), FINAL)
    assert len(head[0]) == 1
    assert head[0][0][0].stride == (1, 1)
    assert pointwise_out_channels(head) == [512]
    z = head(torch.randn(BS, 256, 2, 2))
    assert z.shape == (BS, 512)
    assert_unit_norm(z)


def test_same_shape_as_final_one_stride1_block():
    "A ViT's blocks all have the final block's shape: each head but the final one's still gets one stride-1 block"
    block3, block12 = stage(192, 14, 16, "blocks.2"), stage(192, 14, 16, "blocks.11")
    head = SepConvHead(block3, block12)
    assert len(head[0]) == 1 and head[0][0][0].stride == (1, 1)
    assert pointwise_out_channels(head) == [192]
    assert head(torch.randn(BS, 192, 14, 14)).shape == (BS, 192)
    assert not convs(SepConvHead(block12, block12))  # the final block's head: pooling and normalisation only


def test_mlp_head_output_dim():
    st = stage(64, 16, 2)
    head = MLPHead(st, FINAL, dim=32)
    assert not convs(head)
    lins = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lins] == [(64, 64), (64, 32)]  # hidden: the stage's width
    z = head(torch.randn(BS, 64, 16, 16))
    assert z.shape == (BS, 32)
    assert_unit_norm(z)
    head = MLPHead(st, dim=16, hidden=40)  # final: unused
    lins = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lins] == [(64, 40), (40, 16)]
    assert head(torch.randn(BS, 64, 5, 7)).shape == (BS, 16)  # any resolution: pooled first


def test_head_factory_by_name_or_callable():
    assert HEADS == {"sepconv": SepConvHead, "mlp": MLPHead}
    assert head_factory("sepconv") is SepConvHead and head_factory("mlp") is MLPHead
    f = partial(MLPHead, dim=8)
    assert head_factory(f) is f  # a callable is the factory itself
    head = head_factory(f)(stage(64, 16), FINAL)
    assert head(torch.randn(BS, 64, 16, 16)).shape == (BS, 8)


@pytest.mark.parametrize("bad", ["linear", "SepConv", None, 3])
def test_head_factory_bad_name_raises(bad):
    with pytest.raises(ValueError, match=r"head must be one of \['sepconv', 'mlp'\] or a callable"):
        head_factory(bad)


def test_aux_classifier_output():
    aux = AuxClassifier(stage(64, 16, 2), FINAL, n_out=10)
    assert pointwise_out_channels(aux) == [128, 256, 512]
    assert isinstance(aux[-1], nn.Linear) and aux[-1].in_features == 512 and aux[-1].out_features == 10
    y = aux(torch.randn(BS, 64, 16, 16))
    assert y.shape == (BS, 10)
    # logits, not normalised
    assert not torch.allclose(y.norm(dim=1), torch.ones(BS))
    # on the final stage: pool + linear only
    aux = AuxClassifier(FINAL, FINAL, n_out=7)
    assert not convs(aux)
    assert aux(torch.randn(BS, 512, 2, 2)).shape == (BS, 7)


def test_non_power_of_two_widths_end_at_final_width():
    final = stage(576, 2, 8, "final")
    head = SepConvHead(stage(24, 16, 1), final)
    widths = pointwise_out_channels(head)
    assert len(widths) == 3
    assert widths[-1] == 576
    assert widths == sorted(widths) and widths[0] > 24  # geometric growth: 24 -> 69 -> 200 -> 576
    assert widths == [round(24 * 24 ** (k / 3)) for k in (1, 2, 3)]
    z = head(torch.randn(BS, 24, 16, 16))
    assert z.shape == (BS, 576)
    assert_unit_norm(z)
    # the blocks chain: each block's input width is the previous block's output width
    ins = [blk[0].in_channels for blk in head[0]]
    assert ins == [24] + widths[:-1]


def test_non_power_of_two_resolution_reaches_final_size():
    # 14 -> 7 -> 4 -> 2: log2(7) rounds to 3 blocks
    trunk = conv_trunk(stage(32, 14), stage(128, 2))
    assert len(trunk) == 3
    assert trunk(torch.randn(2, 32, 14, 14)).shape == (2, 128, 2, 2)


def test_sep_conv_block_param_count():
    ni, nf = 4, 8
    blk = sep_conv_block(ni, nf)
    dw = ni * 1 * 3 * 3  # depthwise 3x3: one 3x3 filter per channel, no bias
    expected = (dw + ni * ni + 2 * ni  # dw3x3, pw1x1 ni->ni, BN(ni) weight+bias
                + dw + ni * nf + 2 * nf)  # dw3x3, pw1x1 ni->nf, BN(nf)
    assert expected == 144
    assert sum(p.numel() for p in blk.parameters()) == expected
    assert all(c.bias is None for c in convs(blk))
    assert blk(torch.randn(2, ni, 8, 8)).shape == (2, nf, 4, 4)
    assert sep_conv_block(ni, nf, stride=1)(torch.randn(2, ni, 8, 8)).shape == (2, nf, 8, 8)


def test_heads_backprop_to_input():
    head = SepConvHead(stage(16, 8), stage(64, 2))
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    head(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


# ---------------------------------------------------------------- ConvTrunk: channels-last, checkpointed blocks
ST, FIN = StageInfo('layer1', 16, (16, 16), 4), StageInfo('layer4', 64, (2, 2), 32)
SETTINGS = {'plain (NCHW, nothing recomputed)': dict(checkpoint=0, channels_last=False), 'default (first block recomputed)': dict(),
            'every block recomputed': dict(checkpoint=True), 'every block, NCHW': dict(checkpoint=True, channels_last=False)}


def _trunks():
    "The trunk in every setting, on the same weights"
    torch.manual_seed(0)
    ts = {k: conv_trunk(ST, FIN, **kw) for k, kw in SETTINGS.items()}
    ref = ts['plain (NCHW, nothing recomputed)']
    assert [t.n_checkpoint for t in ts.values()] == [0, 1, 3, 3] and [t.channels_last for t in ts.values()] == [False, True, True, False]
    for t in ts.values():
        assert list(t.state_dict()) == list(ref.state_dict())  # same keys: files load either way
        t.load_state_dict(ref.state_dict())
    return ts


def test_trunk_settings_same_output_gradients_and_bn_statistics():
    ts = _trunks()
    x = torch.randn(4, 16, 16, 16)
    xs = {k: x.clone().requires_grad_() for k in ts}
    outs = {k: t(xs[k]) for k, t in ts.items()}
    ref = 'plain (NCHW, nothing recomputed)'
    for k, t in ts.items():
        torch.testing.assert_close(outs[k], outs[ref], msg=k)
        outs[k].square().sum().backward()
    for k, t in ts.items():
        torch.testing.assert_close(xs[k].grad, xs[ref].grad, msg=k)
        for (n, pa), pb in zip(ts[ref].named_parameters(), t.parameters()):  # up to the order of float sums (another memory layout)
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5*float(pa.grad.abs().max()), msg=f'{k}: {n}')
        for (n, va), vb in zip(ts[ref].state_dict().items(), t.state_dict().values()):
            torch.testing.assert_close(vb, va, msg=f'{k}: {n}')  # running statistics moved once (the recomputation leaves them)
        assert int(t[0][2].num_batches_tracked) == 1
    assert outs['default (first block recomputed)'].is_contiguous(memory_format=torch.channels_last)


def _saved_bytes(m, x):
    "What autograd saves for the backward pass during the forward of `m` on `x`"
    n = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (n.append(t.numel() * t.element_size()), t)[1], lambda t: t):
        m(x).sum().backward()
    return sum(n)


def test_checkpointed_blocks_keep_only_their_input():
    ts = _trunks()
    x = torch.randn(4, 16, 16, 16, requires_grad=True)
    saved = {k: _saved_bytes(t, x) for k, t in ts.items()}
    assert saved['every block recomputed'] == saved['every block, NCHW'] == x.numel() * 4  # the input, once
    plain = ts['plain (NCHW, nothing recomputed)']
    with torch.no_grad(): y = plain[0](x)  # the first block's output: what the later blocks save, from it on
    rest = _saved_bytes(nn.Sequential(*list(plain)[1:]), y.requires_grad_())
    assert saved['default (first block recomputed)'] == x.numel() * 4 + rest
    assert saved['plain (NCHW, nothing recomputed)'] > 1.5 * saved['default (first block recomputed)']


def test_checkpointed_trunk_plain_in_eval_and_no_grad():
    ts = _trunks()
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad(): outs = {k: t(x) for k, t in ts.items()}  # training mode, no graph: no recomputation
    for t in ts.values(): t.eval()
    evals = {k: t(x) for k, t in ts.items()}
    for k in ts:
        torch.testing.assert_close(outs[k], outs['plain (NCHW, nothing recomputed)'], msg=k)
        torch.testing.assert_close(evals[k], evals['plain (NCHW, nothing recomputed)'], msg=k)
    assert {int(t[0][2].num_batches_tracked) for t in ts.values()} == {1}


def test_sepconv_head_checkpoint_and_layout_options():
    assert SepConvHead(ST, FIN, checkpoint=True)[0].n_checkpoint == 3
    t = SepConvHead(ST, FIN)[0]
    assert type(t) is ConvTrunk and t.n_checkpoint == 1 and t.channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in t.parameters() if p.dim() == 4)
    t = SepConvHead(ST, FIN, checkpoint=0, channels_last=False)[0]
    assert t.n_checkpoint == 0 and all(p.is_contiguous() for p in t.parameters())


def test_head_convs_start_from_the_reference_initialisation():
    "kaiming_normal_(mode='fan_out', nonlinearity='relu') on every head conv (std sqrt(2/fan_out)), BatchNorm weight 1 and bias 0"
    torch.manual_seed(0)
    head = SepConvHead(StageInfo('s', 64, (16, 16), 1), StageInfo('f', 512, (2, 2), 8))
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 12
    for c in convs:
        fan_out = c.out_channels * c.kernel_size[0] * c.kernel_size[1]
        assert abs(c.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.1, (c, c.weight.std())
    for bn in (m for m in head.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_strided_entry_conv_runs_in_the_input_layout():
    "The trunk's first (strided) conv runs on the stage's NCHW map; what turns channels-last is its 4x smaller output"
    seen = []
    for kw in (dict(), dict(checkpoint=0)):
        t = conv_trunk(ST, FIN, **kw)
        t.load_state_dict(_trunks()['plain (NCHW, nothing recomputed)'].state_dict())
        assert t.strided_entry and t[0][0].stride == (2, 2)
        h = t[0][0].register_forward_hook(lambda m, i, o: seen.append((i[0].is_contiguous(), o.is_contiguous())))
        x = torch.randn(4, 16, 16, 16)
        out = t(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, _trunks()['plain (NCHW, nothing recomputed)'](x))
        out.sum().backward()
        t(x.contiguous(memory_format=torch.channels_last))  # an input already channels-last: converted by no one
        h.remove()
    n_fwd = [2, 1]  # checkpoint=1 recomputes the first block in the backward pass
    assert seen == [(True, True)] * n_fwd[0] + [(False, False)] + [(True, True)] * n_fwd[1] + [(False, False)]
    assert not conv_trunk(ST, FIN, channels_last=False).strided_entry
    assert not conv_trunk(StageInfo('s', 64, (2, 2), 32), FIN).strided_entry  # a stride-1 block: nothing to gain
