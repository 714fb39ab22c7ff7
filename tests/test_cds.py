"""Tests of `fastai_cds.cds.CDSCallback` inside real fastai training loops, against independent expectations: the loss
(the learner's loss on view 1 + weight x SupCon per head), its gradients, MixUp, bad arguments, batches of one,
checkpointed heads and head factories."""
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.callback.mixup import MixUp
from fastai.layers import Flatten
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed

from fastai_cds.cds import CDSCallback
from fastai_cds.heads import L2Norm, MLPHead, SepConvHead
from fastai_cds.stages import StageInfo
from fastai_cds.views import simclr_tfms

from helpers import Spy, count_calls, no_bar, ref_supcon, small_dls, snapshot, stop, tiny_cnn, tiny_learner

pytestmark = pytest.mark.usefixtures('seeded')  # set_seed(0) before every test (conftest.py)


def one_batch(learn, order=100):
    """Run one training batch; what the model saw (input, fp64 output: hook on the plain model), the raw batch and its
    labels (before CDSCallback), and at `after_loss` the loss, pred, xb and what CDSCallback read (`learn.cds.taps`)"""
    got = {}
    h = learn.model.model.register_forward_hook(
        lambda m, i, o: got.update(inp=i[0].detach().clone(), out=o.detach().double()))
    learn.add_cbs([
        Spy(-10, before_batch=lambda: got.update(raw=learn.x.clone(), y=learn.y.as_subclass(torch.Tensor).clone())),
        Spy(order, after_loss=lambda: got.update(loss=learn.loss_grad.detach().double(), pred=learn.pred.detach().clone(),
                                                 xb=learn.x.clone(), taps=learn.cds.taps), after_batch=stop)])
    try: learn.fit(1)
    finally: h.remove()
    got['heads'] = [z.detach().double() for z in got['taps'].heads]
    return got


# ---------------------------------------------------------------- 1. loss composition
def test_loss_is_ce_on_view1_plus_weighted_supcon_per_head():
    learn = tiny_learner(small_dls(bs=8))
    got = one_batch(learn)
    raw, y, n = got['raw'], got['y'], 8
    # the batch holds both views; the model saw both; the learner's xb and pred are view 1 only
    assert raw.shape[0] == 2 * n and y.shape == (n,)
    torch.testing.assert_close(got['inp'], raw)
    torch.testing.assert_close(got['taps'].x, raw)
    torch.testing.assert_close(got['xb'], raw[:n])
    assert not torch.allclose(raw[:n], raw[n:])  # view 2 is a different augmentation
    assert got['pred'].shape[0] == n
    torch.testing.assert_close(got['pred'].double(), got['out'][:n])

    assert len(got['heads']) == len(learn.model.heads) == 3
    for z in got['heads']:
        assert z.shape[0] == 2 * n
        torch.testing.assert_close(z.norm(dim=1), torch.ones(2 * n, dtype=torch.float64), atol=1e-5, rtol=0)
    ce = F.cross_entropy(got['out'][:n], y)
    contra = [ref_supcon(z, y) for z in got['heads']]
    expected = ce + 0.1 * sum(contra)
    assert abs(got['loss'].item() - expected.item()) < 1e-4
    # the recorded terms are the same numbers
    hist = learn.loss_terms.history
    assert abs(float(hist['ce'][0]) - ce.item()) < 1e-4
    for i, c in enumerate(contra):
        assert len(hist[f'contra_{i}']) == 1
        assert abs(float(hist[f'contra_{i}'][0]) - c.item()) < 1e-4


@pytest.mark.parametrize('supervised', [False, True])
def test_loss_composition_ce_views_2(supervised):
    "ce_views=2: CE on both views (labels repeated); supervised=False: SupCon with each image its own class"
    learn = tiny_learner(small_dls(bs=8), CDSCallback(weight=0.5, ce_views=2, supervised=supervised, verbose=False))
    got = one_batch(learn)
    y = got['y']
    assert got['pred'].shape[0] == 16
    torch.testing.assert_close(got['pred'].double(), got['out'])  # view 1 then view 2
    ids = y if supervised else None
    expected = F.cross_entropy(got['out'], torch.cat([y, y])) + 0.5 * sum(ref_supcon(z, ids) for z in got['heads'])
    assert abs(got['loss'].item() - expected.item()) < 1e-4
    # SimCLR really differs from SupCon on this batch (it has repeated labels)
    assert len(set(y.tolist())) < len(y)
    assert abs(ref_supcon(got['heads'][0], None).item() - ref_supcon(got['heads'][0], y).item()) > 1e-3


# ---------------------------------------------------------------- 2. gradients of the contrastive term
@pytest.mark.parametrize('weight', [1., 0.])
def test_contrastive_gradients_reach_hooked_stages(weight):
    learn = tiny_learner(loss_func=lambda pred, y: 0 * pred.sum(), cds=CDSCallback(weight=weight, verbose=False))
    plain = learn.model.model
    convs = [next(m for m in plain.get_submodule(s.name).modules() if isinstance(m, nn.Conv2d))
             for s in learn.cds.stages]
    fc = plain[-1]
    grads = {}
    learn.add_cb(Spy(100, after_backward=lambda: grads.update(
        convs=[c.weight.grad.clone() for c in convs], fc=fc.weight.grad.clone(),
        heads=[[p.grad.clone() for p in h.parameters() if p.grad is not None] for h in learn.model.heads]),
        after_batch=stop))
    learn.fit(1)
    assert [s.name for s in learn.cds.stages] == ['0', '1', '2']
    assert torch.count_nonzero(grads['fc']) == 0  # after the last stage: only the (zeroed) CE reaches it
    for g in grads['convs']:
        assert (torch.count_nonzero(g) > 0) == (weight > 0)
    # the head on the final map is only pool + L2 norm (no parameters); every other head gets the gradient
    assert [bool(hg) for hg in grads['heads']] == [True, True, False]
    for hg in grads['heads'][:-1]:
        assert any(torch.count_nonzero(g) > 0 for g in hg) == (weight > 0)


# ---------------------------------------------------------------- 3. MixUp
def test_mixup_supcon_gets_hard_labels():
    learn = tiny_learner(small_dls(), cds=CDSCallback(verbose=False))
    learn.add_cb(MixUp())
    batches, seen = [], []
    orig = learn.cds.contrastive
    class Rec(nn.Module):
        def forward(self, z, labels=None):
            seen.append((len(batches), labels.clone()))
            return orig(z, labels)
    learn.cds.contrastive = Rec()
    mixed = []
    learn.add_cbs([Spy(-10, before_batch=lambda: batches.append((learn.y.clone(), learn.x[:len(learn.y)].clone()))),
                   Spy(10, before_batch=lambda: mixed.append(learn.x.clone()),
                       after_loss=lambda: mixed.append(torch.isfinite(learn.loss_grad).item()))])
    learn.fit(1)
    n_heads = len(learn.model.heads)
    assert len(batches) == 4 + 2  # 4 training batches, then 2 validation batches
    assert len(seen) == 4 * n_heads
    for k, labels in seen:
        y = batches[k - 1][0]
        assert labels.dtype == torch.int64 and labels.shape == y.shape
        assert torch.equal(labels.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor))
    # MixUp really mixed view 1 (and only view 1: same batch size)
    for k in range(4):
        x_mixed, x_view1 = mixed[2 * k], batches[k][1]
        assert x_mixed.shape == x_view1.shape and not torch.allclose(x_mixed, x_view1)
        assert mixed[2 * k + 1] is True
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])


def test_ce_views_2_with_mixup_rejected_at_fit_start():
    learn = tiny_learner(small_dls(), cds=CDSCallback(ce_views=2, verbose=False))
    learn.add_cb(MixUp())
    n = [0]
    learn.add_cb(Spy(before_batch=lambda: n.__setitem__(0, n[0] + 1)))
    with pytest.raises(ValueError, match=r'ce_views=2\) cannot be combined with MixUp'): learn.fit(1)
    assert n[0] == 0


# ---------------------------------------------------------------- 4. bad input
@pytest.mark.parametrize('kwargs,match', [
    (dict(weight=-1), 'weight must be >= 0'),
    (dict(weight=float('nan')), 'weight must be >= 0'),
    (dict(temperature=0), 'temperature must be > 0'),
    (dict(base_temperature=-1), 'base_temperature must be > 0'),
    (dict(ce_views=3), 'ce_views must be 1 or 2'),
    (dict(head='foo'), r"head must be one of \['sepconv', 'mlp'\] or a callable"),
    (dict(head=None), r"head must be one of \['sepconv', 'mlp'\] or a callable"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match): CDSCallback(**kwargs)


def test_supervised_without_labels_rejected_at_fit_start():
    learn = tiny_learner(small_dls(labels=False), loss_func=lambda pred: pred.pow(2).mean())
    n = [0]
    learn.add_cb(Spy(before_batch=lambda: n.__setitem__(0, n[0] + 1)))
    with pytest.raises(ValueError, match='give no labels'): learn.fit(1)
    assert n[0] == 0


def test_no_labels_rejected_at_fit_start_even_for_simclr():
    # fastai computes no loss (and no backward) for a batch without labels: CDS needs labelled batches,
    # unlabelled images go through `unlabelled=`. The error says so before any batch runs.
    learn = tiny_learner(small_dls(labels=False), loss_func=lambda pred: pred.pow(2).mean(),
                         cds=CDSCallback(supervised=False, verbose=False))
    n = [0]
    learn.add_cb(Spy(before_batch=lambda: n.__setitem__(0, n[0] + 1)))
    with pytest.raises(ValueError, match='unlabelled='): learn.fit(1)
    assert n[0] == 0


def test_view2_is_resolved_at_fit_start():
    "view2_tfms=None: SimCLR's transforms for the images' channels; a given list is used as is"
    learn = tiny_learner(small_dls())
    learn.fit(1, cbs=Spy(100, after_batch=stop))
    assert [type(t) for t in learn.cds.view2] == [type(t) for t in simclr_tfms(n_channels=1)]
    tfms = simclr_tfms(n_channels=1)[:1]
    learn = tiny_learner(small_dls(), CDSCallback(view2_tfms=tfms, verbose=False))
    learn.fit(1, cbs=Spy(100, after_batch=stop))
    assert learn.cds.view2 is tfms


# ---------------------------------------------------------------- 5. a training batch of one
def _last_batch_of_one():
    learn = tiny_learner(small_dls(n_train=17, n_valid=8, bs=8, drop_last=False))
    calls, hs = count_calls(learn.model.heads[:1])
    rec = []
    learn.add_cb(Spy(100, after_loss=lambda: learn.training and rec.append(
        (learn.pred.shape[0], learn.loss_grad.detach().clone(), learn.pred.detach().clone(), learn.y.clone(), calls[0],
         learn.cds.ids is None, learn.cds.taps is None, learn.model.armed))))
    return learn, rec


def test_last_training_batch_of_one_runs_the_heads():
    "Under DDP every head parameter needs a gradient at every step: a lone image runs the heads, its contrastive term is 0"
    learn, rec = _last_batch_of_one()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warning either
        learn.fit(1)
    assert [r[0] for r in rec] == [8, 8, 1]
    for n, loss, pred, y, *_ in rec:
        assert torch.isfinite(loss)
        if n == 1: torch.testing.assert_close(loss, F.cross_entropy(pred.float(), y.as_subclass(torch.Tensor)))  # + 0.1 x 0
    assert [r[4] for r in rec] == [1, 2, 3]  # the lone image (last batch) ran the heads too
    assert [r[5:] for r in rec] == [(False, False, False)] * 3  # ids and taps on every batch
    assert learn.model.armed is False
    assert [float(v) for v in learn.loss_terms.history['contra_0']][-1] == 0.  # its only positive is its other view
    assert all(math.isfinite(float(v)) for v in learn.recorder.losses)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])


def test_epoch_term_means_count_every_batch():
    learn, rec = _last_batch_of_one()
    learn.fit(1)
    hist = learn.loss_terms.history
    names = list(learn.recorder.metric_names[1:-1])
    row = dict(zip(names, learn.recorder.values[-1]))
    assert set(hist) == {'ce', 'contra_0', 'contra_1', 'contra_2'}
    for k, v in hist.items():
        assert len(v) == 3
        assert abs(row[k] - float(np.mean([float(t) for t in v]))) < 1e-5, k


# ---------------------------------------------------------------- 6. heads: factories, checkpointing
def test_head_mlp_by_name():
    learn = tiny_learner(small_dls(bs=8), CDSCallback(head='mlp', verbose=False))
    assert all(type(h) is MLPHead for h in learn.model.heads)
    got = one_batch(learn)
    assert [tuple(z.shape) for z in got['heads']] == [(16, 128)] * 3  # MLPHead's default dim
    exp = F.cross_entropy(got['out'][:8], got['y']) + 0.1 * sum(ref_supcon(z, got['y']) for z in got['heads'])
    assert abs(got['loss'].item() - exp.item()) < 1e-4


def test_head_factory_callable_gets_each_stage_and_the_final_map():
    calls = []
    def factory(stage, final):
        calls.append((stage, final))
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(stage.channels, 8), L2Norm())
    learn = tiny_learner(small_dls(bs=8), CDSCallback(head=factory, verbose=False))
    assert [s.name for s, _ in calls] == ['0', '1', '2'] and all(isinstance(s, StageInfo) for s, _ in calls)
    assert all(f == calls[-1][0] and f.name == '2' for _, f in calls)  # the final map: the last stage of tiny_cnn
    assert [h[2].in_features for h in learn.model.heads] == [8, 16, 32]
    got = one_batch(learn)
    assert [tuple(z.shape) for z in got['heads']] == [(16, 8)] * 3
    hist = learn.loss_terms.history
    for k, z in enumerate(got['heads']): assert abs(float(hist[f'contra_{k}'][0]) - ref_supcon(z, got['y']).item()) < 1e-4
    # a partial of a head class is a factory too
    learn = tiny_learner(small_dls(bs=8), CDSCallback(head=partial(MLPHead, dim=16, hidden=8), verbose=False))
    assert [(h[2].out_features, h[4].out_features) for h in learn.model.heads] == [(8, 16)] * 3


def test_recomputed_heads_train_exactly_like_the_default():
    "Recomputing the heads in the backward pass changes memory, not training: same keys, same weights after a step"
    learners = []
    for head in (SepConvHead, partial(SepConvHead, checkpoint=True)):
        set_seed(0)
        learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(),
                               cbs=[CDSCallback(view2_tfms=[], head=head, verbose=False), Spy(after_step=stop)]))
        learners.append(learn)
    a, b = learners
    assert all(h[0].n_checkpoint == len(h[0]) for h in b.model.heads) and len(b.model.heads[0][0]) > 0
    assert all(h[0].n_checkpoint <= 1 for h in a.model.heads)
    assert list(a.model.state_dict()) == list(b.model.state_dict())
    b.model.load_state_dict(a.model.state_dict())
    before = snapshot(a.model)
    for learn in learners:
        set_seed(1)
        learn.fit(1)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)
    assert not torch.equal(before['heads.0.0.0.1.weight'], a.model.state_dict()['heads.0.0.0.1.weight'])  # the step trained the heads
