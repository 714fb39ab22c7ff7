"""Tests of `fastai_cds.model`: `DeepSupervisionModel`'s protocol (`arm` exactly one forward, `read` what it recorded,
`hooked` for a block of forwards, `disarm`), checked against the plain model run by hand; its state_dict; and
`split_with_heads`."""
import pytest
import torch
import torch.nn as nn
from fastai.torch_core import trainable_params

from fastai_cds.heads import SepConvHead
from fastai_cds.model import DeepSupervisionModel, Taps, split_with_heads
from fastai_cds.stages import find_stages

from helpers import count_calls, hooked_modules, tiny_cnn

pytestmark = pytest.mark.usefixtures('seeded')  # set_seed(0) before every test (conftest.py)

STAGES = ['0', '1', '2']  # `tiny_cnn`: three stride-2 ConvLayers


def make_ds(aux=None):
    "`tiny_cnn` with sep-conv heads on its three stages, in eval mode (deterministic BatchNorm)"
    m = tiny_cnn()
    x = torch.randn(2, 1, 16, 16)
    stages, final = find_stages(m, x)
    assert [s.name for s in stages] == STAGES
    return DeepSupervisionModel(m, nn.ModuleList([SepConvHead(s, final) for s in stages]), STAGES, aux).eval()


def by_hand(ds, x):
    "The plain model's logits, its stage outputs and the heads' outputs, computed module by module without any hook"
    m, h, stages = ds.model, x, []
    for k in range(3):
        h = m[k](h)
        stages.append(h)
    out = h
    for k in range(3, len(m)): out = m[k](out)
    return out, stages, [head(s) for head, s in zip(ds.heads, stages)]


def batch(n=4, seed=0):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the plain forward
def test_unarmed_forward_is_the_plain_model_and_records_nothing():
    ds = make_ds()
    x = batch()
    calls, hs = count_calls(ds.heads)
    with torch.no_grad(): out, ref = ds(x), ds.model(x)
    for h in hs: h.remove()
    torch.testing.assert_close(out, by_hand(ds, x)[0])
    assert torch.equal(out, ref) and out.shape == (4, 10)
    assert calls[0] == 0 and not ds.armed and ds.read() is None
    assert hooked_modules(ds) == []


# ---------------------------------------------------------------- arm / read
def test_armed_forward_records_input_stages_and_heads():
    ds = make_ds()
    x = batch()
    ds.arm()
    assert ds.armed
    with torch.no_grad(): out = ds(x)
    assert not ds.armed  # one forward only
    with torch.no_grad(): ref_out, ref_stages, ref_heads = by_hand(ds, x)
    torch.testing.assert_close(out, ref_out)
    taps = ds.read()
    assert isinstance(taps, Taps) and taps._fields == ('x', 'stages', 'heads')
    assert torch.equal(taps.x, x)
    assert [tuple(s.shape) for s in taps.stages] == [(4, 8, 8, 8), (4, 16, 4, 4), (4, 32, 2, 2)]
    for got, exp in zip(taps.stages, ref_stages): torch.testing.assert_close(got, exp)
    assert [tuple(z.shape) for z in taps.heads] == [(4, 32)] * 3  # the final map's width
    for got, exp in zip(taps.heads, ref_heads): torch.testing.assert_close(got, exp)
    # read forgets: a second read, and a forward after it, record nothing
    assert ds.read() is None
    calls, hs = count_calls(ds.heads)
    with torch.no_grad(): ds(x)
    for h in hs: h.remove()
    assert calls[0] == 0 and ds.read() is None
    assert hooked_modules(ds) == []  # the hooks of an armed forward outside `hooked` are removed after it


def test_arm_with_extra_images_runs_on_the_concatenation():
    ds = make_ds()
    x, a, b = batch(4, 0), batch(3, 1), batch(3, 2)
    ds.arm(a, b)
    with torch.no_grad(): out = ds(x)
    whole = torch.cat([x, a, b])
    with torch.no_grad(): ref_out, ref_stages, ref_heads = by_hand(ds, whole)
    assert out.shape == (10, 10)
    torch.testing.assert_close(out, ref_out)
    taps = ds.read()
    assert torch.equal(taps.x, whole)
    assert all(s.shape[0] == 10 for s in taps.stages) and all(z.shape[0] == 10 for z in taps.heads)
    for got, exp in zip(taps.heads, ref_heads): torch.testing.assert_close(got, exp)
    # arming again replaces the extra images: the last arm counts
    ds.arm(a)
    ds.arm()
    with torch.no_grad(): assert ds(x).shape == (4, 10)
    assert ds.read().x.shape[0] == 4


def test_disarm_and_read_disarm():
    ds = make_ds()
    x = batch()
    ds.arm(batch(2, 1))
    ds.disarm()
    assert not ds.armed
    with torch.no_grad(): assert ds(x).shape == (4, 10)
    assert ds.read() is None
    ds.arm()
    assert ds.read() is None and not ds.armed  # nothing recorded yet; reading disarms
    with torch.no_grad(): ds(x)
    assert ds.read() is None


def test_armed_training_forward_keeps_the_graph():
    "Stage and head outputs of an armed training forward require grad and backpropagate to the input and the heads"
    ds = make_ds().train()
    x = batch().requires_grad_()
    with ds.hooked():
        ds.arm()
        ds(x)
        taps = ds.read()
    assert all(s.requires_grad and s.grad_fn is not None for s in taps.stages)
    assert all(z.requires_grad and z.grad_fn is not None for z in taps.heads)
    (g,) = torch.autograd.grad(taps.stages[0].sum(), x, retain_graph=True)
    assert g.abs().sum() > 0
    sum(z.sum() for z in taps.heads[:2]).backward()  # the head on the final map has no parameters
    for h in ds.heads[:2]: assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- hooked
def test_hooked_registers_the_stage_hooks_for_the_block_only():
    ds = make_ds()
    x = batch()
    assert hooked_modules(ds) == []
    with ds.hooked() as d:
        assert d is ds
        assert hooked_modules(ds) == [f'model.{n}' for n in STAGES]  # on the stages, nowhere else
        with torch.no_grad():
            ds(x)  # plain forwards inside the block record nothing
            assert ds.read() is None
            ds.arm()
            ds(x)
            assert hooked_modules(ds) == [f'model.{n}' for n in STAGES]  # an armed forward leaves them to the block
            taps = ds.read()
            ds(x)
        ref_out, ref_stages, _ = by_hand(ds, x)
        for got, exp in zip(taps.stages, ref_stages): torch.testing.assert_close(got, exp)
        ds.arm()
    assert hooked_modules(ds) == [] and not ds.armed  # hooks removed, arming forgotten


@pytest.mark.parametrize('where', ['in the block', 'in the forward'])
def test_hooked_removes_the_hooks_and_disarms_on_exception(where):
    ds = make_ds()
    boom = None
    if where == 'in the forward':  # after the first stage of an armed forward
        def raise_(*_): raise RuntimeError('boom')
        boom = ds.model[1].register_forward_hook(raise_)
    with pytest.raises(RuntimeError, match='boom'):
        with ds.hooked():
            ds.arm()
            if boom is not None: ds(batch())
            raise RuntimeError('boom')
    if boom is not None: boom.remove()
    assert hooked_modules(ds) == [] and not ds.armed and ds.read() is None
    with torch.no_grad(): torch.testing.assert_close(ds(batch()), by_hand(ds, batch())[0])


def test_exception_in_an_armed_forward_outside_hooked_removes_its_hooks():
    ds = make_ds()
    h = ds.model[2].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError('boom')))
    ds.arm()
    with pytest.raises(RuntimeError, match='boom'): ds(batch())
    h.remove()
    assert hooked_modules(ds) == [] and not ds.armed and ds.read() is None


def test_unknown_stage_name_raises():
    ds = DeepSupervisionModel(tiny_cnn(), nn.ModuleList([nn.Identity()]), ['nope'])
    with pytest.raises(AttributeError):
        with ds.hooked(): pass
    assert hooked_modules(ds) == []


# ---------------------------------------------------------------- state_dict, parameter groups
def test_state_dict_keys_model_heads_aux():
    ds = make_ds(aux={'distill': nn.ModuleList([nn.Linear(32, 64), nn.Identity()])})
    assert isinstance(ds.aux, nn.ModuleDict) and list(ds.aux) == ['distill']
    sd = ds.state_dict()
    plain = {f'model.{k}' for k in ds.model.state_dict()}
    heads = {f'heads.{k}' for k in ds.heads.state_dict()}
    assert set(sd) == plain | heads | {'aux.distill.0.weight', 'aux.distill.0.bias'}
    assert heads and all(f'model.{k}' in sd for k in tiny_cnn().state_dict())
    assert list(make_ds().aux) == []  # no aux: an empty ModuleDict, no keys


def test_split_with_heads_puts_heads_and_aux_in_the_last_group():
    ds = make_ds(aux={'distill': nn.ModuleList([nn.Linear(32, 64)])})
    extra = list(ds.heads.parameters()) + list(ds.aux.parameters())
    assert extra
    ids = lambda ps: [id(p) for p in ps]
    # a splitter giving groups
    groups = split_with_heads(lambda m: [list(m[:2].parameters()), list(m[2:].parameters())], ds)
    assert len(groups) == 2
    assert ids(groups[0]) == ids(ds.model[:2].parameters())
    assert ids(groups[1]) == ids(ds.model[2:].parameters()) + ids(extra)
    # a splitter giving a flat list of parameters: one group
    flat = split_with_heads(trainable_params, ds)
    assert ids(flat) == ids(ds.model.parameters()) + ids(extra)
