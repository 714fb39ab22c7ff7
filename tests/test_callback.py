"Tests of `fastai_cds.callback.CDSCallback` inside real fastai training loops, against independent expectations."
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle/fine_tune/lr_find)
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.layers import Flatten
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.vision.learner import vision_learner

from fastai_cds.callback import CDSCallback, DeviceMixedPrecision, LossTerms, to_mixed_precision
from fastai_cds.export import DeepSupervisionModel
from fastai_cds.losses import SupConLoss

from helpers import CPUAutocast, Spy, is_bn, no_bar, ref_supcon, scan_pickle, small_dls, snapshot, stop, tiny_cnn

pytestmark = pytest.mark.usefixtures('seeded')  # set_seed(0) before every test (conftest.py)


# ---------------------------------------------------------------- helpers
def tiny_learner(dls=None, cds=None, loss_func=None, **kwargs):
    dls = dls if dls is not None else small_dls()
    cds = cds if cds is not None else CDSCallback(verbose=False)
    return no_bar(Learner(dls, tiny_cnn(dls.one_batch()[0].shape[1]), loss_func=loss_func or CrossEntropyLossFlat(),
                          cbs=cds, **kwargs))


def param_snapshot(module):
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def manual_valid(learn):
    "Logits and targets of the plain model, in eval mode, over the validation set"
    m = learn.model.model
    was = m.training
    m.eval()
    logits, ys = [], []
    with torch.no_grad():
        for xb, yb in learn.dls.valid:
            logits.append(m(xb).float().as_subclass(torch.Tensor))
            ys.append(yb.as_subclass(torch.Tensor))
    m.train(was)
    return torch.cat(logits), torch.cat(ys)


def count_calls(modules):
    "Forward hooks counting calls; returns (counter list, handles)"
    n = [0]
    def inc(*_): n[0] += 1
    return n, [m.register_forward_hook(inc) for m in modules]


# ---------------------------------------------------------------- 1. loss composition
def test_loss_is_ce_on_view1_plus_weighted_supcon_per_head():
    learn = tiny_learner(small_dls(bs=8))
    ds = learn.model
    n_heads = len(ds.heads)
    got, heads_out = {}, []
    hs = [h.register_forward_hook(lambda m, i, o: heads_out.append(o.detach().double())) for h in ds.heads]
    hs.append(ds.model.register_forward_hook(
        lambda m, i, o: got.update(inp=i[0].detach().clone(), out=o.detach().double())))
    learn.add_cbs([
        Spy(-10, before_batch=lambda: got.update(raw=learn.x.clone(), y=learn.y.clone())),
        Spy(100, before_batch=lambda: got.update(xb=learn.x.clone()),
            after_loss=lambda: got.update(loss=learn.loss_grad.detach().double(), pred=learn.pred.detach().clone()),
            after_batch=stop)])
    learn.fit(1)
    for h in hs: h.remove()

    raw, y, n = got['raw'], got['y'].as_subclass(torch.Tensor), 8
    # the batch holds both views; the model saw both; the learner's xb and pred are view 1 only
    assert raw.shape[0] == 2 * n and y.shape == (n,)
    torch.testing.assert_close(got['inp'], raw)
    torch.testing.assert_close(got['xb'], raw[:n])
    assert not torch.allclose(raw[:n], raw[n:])  # view 2 is a different augmentation
    assert got['pred'].shape[0] == n
    torch.testing.assert_close(got['pred'].double(), got['out'][:n])

    assert len(heads_out) == n_heads == 3
    for z in heads_out:
        assert z.shape[0] == 2 * n
        torch.testing.assert_close(z.norm(dim=1), torch.ones(2 * n, dtype=torch.float64), atol=1e-5, rtol=0)
    ce = F.cross_entropy(got['out'][:n], y)
    contra = [ref_supcon(z, y) for z in heads_out]
    expected = ce + 0.1 * sum(contra)
    assert abs(got['loss'].item() - expected.item()) < 1e-4
    # the recorded terms are the same numbers
    hist = learn.loss_terms.history
    assert abs(float(hist['ce'][0]) - ce.item()) < 1e-4
    for i, c in enumerate(contra):
        assert len(hist[f'contra_{i}']) == 1
        assert abs(float(hist[f'contra_{i}'][0]) - c.item()) < 1e-4


def test_loss_composition_ce_views_2_and_simclr():
    "ce_views=2: CE on both views (labels repeated); supervised=False: SupCon with each image its own class"
    learn = tiny_learner(small_dls(bs=8), CDSCallback(weight=0.5, ce_views=2, supervised=False, verbose=False))
    got, heads_out = {}, []
    hs = [h.register_forward_hook(lambda m, i, o: heads_out.append(o.detach().double())) for h in learn.model.heads]
    hs.append(learn.model.model.register_forward_hook(lambda m, i, o: got.update(out=o.detach().double())))
    learn.add_cbs([Spy(-10, before_batch=lambda: got.update(y=learn.y.clone())),
                   Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach().double(),
                                                          npred=learn.pred.shape[0]), after_batch=stop)])
    learn.fit(1)
    for h in hs: h.remove()
    y = got['y'].as_subclass(torch.Tensor)
    assert got['npred'] == 16
    expected = F.cross_entropy(got['out'], torch.cat([y, y])) + 0.5 * sum(ref_supcon(z, None) for z in heads_out)
    assert abs(got['loss'].item() - expected.item()) < 1e-4
    # SimCLR really differs from SupCon on this batch (it has repeated labels)
    assert len(set(y.tolist())) < len(y)
    assert abs(ref_supcon(heads_out[0], None).item() - ref_supcon(heads_out[0], y).item()) > 1e-3


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


# ---------------------------------------------------------------- 3. heads train in both fine_tune phases; optimizer
class Phases(Callback):
    "Parameters and trainability at the start and end of every `fit`"
    order = 100
    def __init__(self): self.phases = []
    def before_fit(self):
        self.start = param_snapshot(self.learn.model)
        self.trainable = {k for k, p in self.learn.model.named_parameters() if p.requires_grad}
    def after_fit(self):
        self.phases.append((self.start, param_snapshot(self.learn.model), self.trainable))


def test_heads_train_in_both_fine_tune_phases_and_get_weight_decay():
    dls = small_dls(n_train=32, n_valid=8, size=32, n_channels=3, bs=16)
    learn = no_bar(vision_learner(dls, torchvision.models.resnet18, pretrained=False, cbs=CDSCallback(verbose=False)))
    ds = learn.model
    body = ds.model[0]
    bn_names = {f'model.0.{mn}.{pn}' for mn, m in body.named_modules() if is_bn(m) for pn, _ in m.named_parameters()}
    body_names = {f'model.0.{k}' for k, _ in body.named_parameters()}
    head_names = {f'heads.{k}' for k, _ in ds.heads.named_parameters()}
    ph = Phases()
    learn.add_cb(ph)
    learn.fine_tune(1, freeze_epochs=1)
    assert len(ph.phases) == 2
    changed = lambda s, e, k: not torch.equal(s[k], e[k])

    (s, e, tr) = ph.phases[0]  # frozen
    assert head_names <= tr
    trained = [i for i, h in enumerate(ds.heads) if list(h.parameters())]
    assert trained == [0, 1, 2]  # the head on the final map (layer4) is pool + L2 norm only
    for i in trained:
        assert any(changed(s, e, k) for k in head_names if k.startswith(f'heads.{i}.')), f"head {i} did not train"
    frozen = body_names - bn_names
    assert frozen and not (frozen & tr)
    assert not [k for k in frozen if changed(s, e, k)], "frozen body parameters changed"
    assert any(changed(s, e, k) for k in bn_names)  # train_bn
    assert any(changed(s, e, k) for k in e if k.startswith('model.1.'))  # fastai's head

    (s, e, tr) = ph.phases[1]  # unfrozen
    assert body_names <= tr and head_names <= tr
    for i in trained:
        assert any(changed(s, e, k) for k in head_names if k.startswith(f'heads.{i}.'))
    assert changed(s, e, 'model.0.0.weight')  # the stem conv trains now
    assert sum(changed(s, e, k) for k in frozen) > 0.9 * len(frozen)

    # the heads sit in the last parameter group, and only there
    head_ps = list(ds.heads.parameters())
    groups = learn.opt.param_lists
    assert all(any(p is q for q in groups[-1]) for p in head_ps)
    assert not any(p is q for g in groups[:-1] for q in g for p in head_ps)
    # weight decay on the heads: a fresh optimizer step with zero gradients multiplies the head conv weights by
    # (1 - lr*wd) (Adam's own step is 0), and leaves their BatchNorm parameters alone (wd_bn_bias=False)
    learn.create_opt()
    learn.opt.set_hyper('lr', 0.1)
    lr, wd = learn.opt.hypers[-1]['lr'], learn.opt.hypers[-1]['wd']
    assert wd > 0
    convs = [m.weight for m in ds.heads.modules() if isinstance(m, nn.Conv2d)]
    bns = [p for m in ds.heads.modules() if is_bn(m) for p in m.parameters()]
    assert convs and bns
    old = {id(p): p.detach().clone() for p in convs + bns}
    for g in learn.opt.param_lists:
        for p in g: p.grad = torch.zeros_like(p)
    learn.opt.step()
    for p in convs: torch.testing.assert_close(p.detach(), old[id(p)] * (1 - lr * wd))
    for p in bns: assert torch.equal(p.detach(), old[id(p)])


# ---------------------------------------------------------------- 4. save / load
def test_save_load_round_trip_keeps_heads(tmp_path):
    dls = small_dls()
    learn = tiny_learner(dls, path=tmp_path)
    learn.add_cb(Spy(100, after_batch=stop))
    learn.fit(1)  # one step: heads, their BN buffers and their optimizer state move away from a fresh init
    f = learn.save('x')
    assert f.exists() and f.parent == tmp_path / 'models'
    state = torch.load(f, map_location='cpu', weights_only=False)
    assert set(state) == {'model', 'opt'}
    sd = state['model']
    head_keys = [k for k in sd if k.startswith('heads.')]
    assert head_keys and {k for k in sd if not k.startswith('heads.')} == {f'model.{k}' for k in learn.model.model.state_dict()}
    assert set(head_keys) == {f'heads.{k}' for k in learn.model.heads.state_dict()}

    learn2 = tiny_learner(dls, path=tmp_path)
    h1 = snapshot(learn.model.heads)
    assert any(not torch.equal(v, learn2.model.heads.state_dict()[k]) for k, v in h1.items() if v.is_floating_point())
    learn2.load('x')
    h2 = learn2.model.heads.state_dict()
    assert h1.keys() == h2.keys()
    for k in h1: assert torch.equal(h1[k], h2[k]), k
    for k, v in learn.model.model.state_dict().items(): assert torch.equal(v, learn2.model.model.state_dict()[k])
    # the optimizer state came back for the heads as well
    assert [len(g) for g in learn2.opt.param_lists] == [len(g) for g in learn.opt.param_lists]
    n_checked = 0
    for p1, p2 in zip(learn.model.heads.parameters(), learn2.model.heads.parameters()):
        s1, s2 = learn.opt.state[p1], learn2.opt.state[p2]
        if 'grad_avg' in s1:
            assert torch.equal(s1['grad_avg'], s2['grad_avg']) and torch.equal(s1['sqr_avg'], s2['sqr_avg'])
            n_checked += 1
    assert n_checked > 0


# ---------------------------------------------------------------- 5. fastai's training and inference entry points
def test_lr_find_fit_one_cycle_fine_tune_validate_get_preds_tta(tmp_path):
    learn = tiny_learner(small_dls(), path=tmp_path, metrics=accuracy)
    calls, hs = count_calls(learn.model.heads)
    before = snapshot(learn.model)
    sug = learn.lr_find(num_it=6, show_plot=False)
    assert math.isfinite(sug.valley) and sug.valley > 0
    assert calls[0] > 0  # heads ran while lr_find trained
    after = snapshot(learn.model)  # lr_find restores the weights, heads included
    for k in before: assert torch.equal(before[k], after[k]), k

    learn.fit_one_cycle(1)
    names = list(learn.recorder.metric_names)
    assert names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'ce', 'contra_0', 'contra_1', 'contra_2', 'time']
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])
    learn.fine_tune(1, freeze_epochs=1)
    assert len(learn.recorder.values) == 1  # fine_tune's last fit; the frozen one before it is a separate fit
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])

    calls[0] = 0
    logits, ys = manual_valid(learn)
    loss, acc = learn.validate()
    assert abs(loss - F.cross_entropy(logits, ys).item()) < 1e-5
    assert abs(acc - (logits.argmax(1) == ys).float().mean().item()) < 1e-6
    preds, targs = learn.get_preds()
    torch.testing.assert_close(preds.as_subclass(torch.Tensor), F.softmax(logits, 1))
    assert torch.equal(targs.as_subclass(torch.Tensor), ys)
    raw, _ = learn.get_preds(act=lambda x: x)
    torch.testing.assert_close(raw.as_subclass(torch.Tensor), logits)
    (aug, plain), targs = learn.tta(n=2, beta=None)
    torch.testing.assert_close(plain.as_subclass(torch.Tensor), F.softmax(logits, 1))
    assert aug.shape == plain.shape and torch.isfinite(aug).all()
    torch.testing.assert_close(aug.sum(1), torch.ones(len(aug)))
    assert calls[0] == 0, "a head ran during validation/get_preds/tta"
    assert learn.model.run_heads is False and learn.model.extra_input is None
    for h in hs: h.remove()


# ---------------------------------------------------------------- 6. MixUp
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


# ---------------------------------------------------------------- 7. bad input
@pytest.mark.parametrize('kwargs,match', [
    (dict(weight=-1), 'weight must be >= 0'),
    (dict(weight=float('nan')), 'weight must be >= 0'),
    (dict(temperature=0), 'temperature must be > 0'),
    (dict(base_temperature=-1), 'base_temperature must be > 0'),
    (dict(ce_views=3), 'ce_views must be 1 or 2'),
    (dict(head='foo'), "head must be 'sepconv' or 'mlp'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match): CDSCallback(**kwargs)


def test_unknown_layer_lists_available_stages_at_creation():
    dls = small_dls()
    with pytest.raises(ValueError, match=r"No module named 'nope'.*Stages found: '0', '1', '2'"):
        Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(layers=['nope']))
    with pytest.raises(IndexError, match='out of range'):
        Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(layers=[5]))
    # and the valid spellings pick what they say
    learn = Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(layers=['1', -1], verbose=False))
    assert [s.name for s in learn.cds.stages] == ['1', '2'] and len(learn.model.heads) == 2


def test_model_without_feature_maps_rejected_at_creation():
    mlp = nn.Sequential(Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match='4-D feature maps'):
        Learner(small_dls(), mlp, loss_func=CrossEntropyLossFlat(), cbs=CDSCallback())


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


def test_batch_size_1_rejected_at_fit_start():
    learn = tiny_learner(small_dls(n_train=8, n_valid=4, bs=1))
    n = [0]
    learn.add_cb(Spy(before_batch=lambda: n.__setitem__(0, n[0] + 1)))
    with pytest.raises(ValueError, match='batch size of at least 2'): learn.fit(1)
    assert n[0] == 0


def _last_batch_of_one():
    learn = tiny_learner(small_dls(n_train=17, n_valid=8, bs=8, drop_last=False))
    calls, hs = count_calls(learn.model.heads[:1])
    rec = []
    learn.add_cb(Spy(100, after_loss=lambda: learn.training and rec.append(
        (learn.pred.shape[0], learn.loss_grad.detach().clone(), learn.pred.detach().clone(), learn.y.clone(), calls[0]))))
    return learn, rec


def test_last_training_batch_of_one_warns_and_stays_finite():
    learn, rec = _last_batch_of_one()
    with pytest.warns(UserWarning, match='skips the contrastive term'): learn.fit(1)
    assert [r[0] for r in rec] == [8, 8, 1]
    for n, loss, pred, y, _ in rec:
        assert torch.isfinite(loss)
        if n == 1: torch.testing.assert_close(loss, F.cross_entropy(pred.float(), y.as_subclass(torch.Tensor)))
    assert [r[4] for r in rec] == [1, 2, 2]  # the lone image (last batch) ran no head
    assert all(math.isfinite(float(v)) for v in learn.recorder.losses)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])


def test_epoch_term_means_ignore_skipped_batch():
    learn, rec = _last_batch_of_one()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1)
    hist = learn.loss_terms.history
    names = list(learn.recorder.metric_names[1:-1])
    row = dict(zip(names, learn.recorder.values[-1]))
    for k, v in hist.items():
        assert len(v) == 2
        assert abs(row[k] - float(np.mean([float(t) for t in v]))) < 1e-5, k


# ---------------------------------------------------------------- 8. cancellation and errors leave no trace
class Boom(RuntimeError): pass


def _raise(ex):
    raise ex


@pytest.mark.parametrize('case', [
    'cancel_fit_in_after_pred', 'error_in_after_loss', 'error_in_after_loss_before_cds', 'error_inside_forward',
    'error_in_before_batch_after_cds',
])
def test_interrupted_fit_leaves_no_hooks_and_validate_works(case):
    learn = tiny_learner(small_dls(n_train=32, bs=8))
    ds = learn.model
    tfms_before, fs_before = learn.dls.train.after_batch, list(learn.dls.train.after_batch.fs)
    mid = lambda: learn.training and learn.iter == 1
    handles, expect = [], None
    if case == 'cancel_fit_in_after_pred':
        learn.add_cb(Spy(0, after_pred=lambda: mid() and stop()))
    elif case == 'error_in_after_loss':
        learn.add_cb(Spy(100, after_loss=lambda: mid() and _raise(Boom('x')))); expect = Boom
    elif case == 'error_in_after_loss_before_cds':
        learn.add_cb(Spy(-10, after_loss=lambda: mid() and _raise(Boom('x')))); expect = Boom
    elif case == 'error_inside_forward':  # in the middle of the hooked forward, after the first stage
        stage = ds.model.get_submodule(learn.cds.stages[1].name)
        def boom(m, i, o):
            if mid(): raise Boom('x')
        handles.append(stage.register_forward_hook(boom))
        expect = Boom
    elif case == 'error_in_before_batch_after_cds':
        learn.add_cb(Spy(0, before_batch=lambda: mid() and _raise(Boom('x')))); expect = Boom
    if expect is None: learn.fit(1)
    else:
        with pytest.raises(expect): learn.fit(1)
    for h in handles: h.remove()
    assert learn.iter == 1
    hooked = [n for n, m in ds.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    assert learn.dls.train.after_batch is tfms_before and list(learn.dls.train.after_batch.fs) == fs_before
    # fastai sends no event after an arbitrary exception in another callback's before_batch: the state set
    # for that batch is cleared by CDSCallback's next before_batch, before any forward (checked below)
    if case != 'error_in_before_batch_after_cds': assert ds.run_heads is False and ds.extra_input is None
    logits, ys = manual_valid(learn)
    loss = learn.validate()[0]
    assert abs(loss - F.cross_entropy(logits, ys).item()) < 1e-5
    assert ds.run_heads is False and ds.extra_input is None


# ---------------------------------------------------------------- 9. architectures
ARCHS = ['resnet18', 'mobilenet_v3_small', 'efficientnet_b0', 'densenet121', 'convnext_tiny', 'regnet_y_400mf',
         'vgg11_bn'] + [pytest.param(a, marks=pytest.mark.slow) for a in ['resnet50', 'resnext50_32x4d', 'wide_resnet50_2']]


def _one_step(learn):
    "One training batch (forward, backward, step); the loss and the heads' grads and params around it"
    got = {}
    before = param_snapshot(learn.model.heads)
    learn.add_cb(Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach().clone()),
                     after_backward=lambda: got.update(grads=[[p.grad.clone() for p in h.parameters() if p.grad is not None]
                                                              for h in learn.model.heads]),
                     after_batch=stop))
    learn.fit(1)
    after = param_snapshot(learn.model.heads)
    return got, before, after


def _check_step(learn, got, before, after):
    assert torch.isfinite(got['loss'])
    final = learn.cds.final
    for i, (hg, s) in enumerate(zip(got['grads'], learn.cds.stages)):
        if (s.channels, s.size) == (final.channels, final.size):  # a head on the final map: pool + L2 norm only
            assert not list(learn.model.heads[i].parameters())
            continue
        assert hg and all(torch.isfinite(g).all() for g in hg)
        assert any(torch.count_nonzero(g) > 0 for g in hg), f"head {i} got no gradient"
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f'{i}.')), f"head {i} unchanged"


@pytest.mark.parametrize('arch', ARCHS)
def test_torchvision_architectures(arch):
    dls = small_dls(n_train=8, n_valid=4, size=64, n_channels=3, bs=4)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = no_bar(vision_learner(dls, getattr(torchvision.models, arch), pretrained=False,
                                      cbs=CDSCallback(verbose=False)))
    assert isinstance(learn.model, DeepSupervisionModel) and len(learn.model.heads) == 4
    # the four deepest downsampling stages of an ImageNet CNN: /4, /8, /16, /32
    assert [s.reduction for s in learn.cds.stages] == [4, 8, 16, 32]
    got, before, after = _one_step(learn)
    _check_step(learn, got, before, after)


def test_hand_written_sequential_cnn():
    dls = small_dls(n_train=16, n_valid=4, bs=8)
    learn = no_bar(Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)))
    assert [(s.name, s.reduction) for s in learn.cds.stages] == [('0', 2), ('1', 4), ('2', 8)]
    assert len(learn.model.heads) == 3 and isinstance(learn.cbs.filter(lambda c: isinstance(c, LossTerms))[0], LossTerms)
    got, before, after = _one_step(learn)
    _check_step(learn, got, before, after)


# ---------------------------------------------------------------- 10. low precision
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('supervised', [True, False])
def test_supcon_low_precision_embeddings(dtype, supervised):
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(16, 32, generator=g), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3]) if supervised else None
    crit = SupConLoss()
    ref = crit(z, labels)
    zl = z.to(dtype).requires_grad_()
    got = crit(zl, labels)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert abs(got.item() - ref.item()) < 1e-2
    got.backward()
    assert zl.grad.dtype == dtype and torch.isfinite(zl.grad).all()


def test_one_batch_under_cpu_bf16_autocast():
    learn = tiny_learner(small_dls())
    learn.add_cb(CPUAutocast())
    dt = {}
    h = learn.model.model.register_forward_hook(lambda m, i, o: dt.update(pred=o.dtype))
    hh = learn.model.heads[0][0].register_forward_hook(lambda m, i, o: dt.update(head=o.dtype))
    got, before, after = _one_step(learn)
    h.remove(); hh.remove()
    assert dt['pred'] == dt['head'] == torch.bfloat16  # autocast was really on, for the model and the heads
    assert got['loss'].dtype == torch.float32
    _check_step(learn, got, before, after)



def test_to_mixed_precision_on_cpu_bf16_forward_fp32_losses_dropped_at_export(tmp_path):
    "fastai's to_fp16/to_bf16 autocast on CUDA only; ours autocasts on the DataLoaders' device and leaves the export"
    from fastai.callback.fp16 import MixedPrecision
    from fastai.learner import load_learner
    learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)))
    assert to_mixed_precision(learn) is learn
    seen = []
    learn.add_cb(Spy(5, after_pred=lambda: learn.training and seen.append((learn.pred.dtype, [z.dtype for z in learn.model.head_outputs])),
                     after_loss=lambda: learn.training and seen.append((learn.loss_grad.dtype, [t.dtype for t in learn.cds.terms.values()]))))
    learn.fit(1)
    assert seen[0] == (torch.bfloat16, [torch.bfloat16] * len(learn.model.heads))  # forward and heads in bf16
    assert seen[1][0] == torch.float32 and set(seen[1][1]) == {torch.float32}  # CE and contrastive terms in fp32
    assert torch.isfinite(learn.recorder.losses[-1])
    learn.export(tmp_path/'m.pkl')
    raw, members = scan_pickle(tmp_path/'m.pkl')
    assert b'fastai_cds' not in raw and b'fastai_cds' not in members
    assert not any(isinstance(cb, MixedPrecision) for cb in load_learner(tmp_path/'m.pkl').cbs)
    assert sum(isinstance(cb, DeviceMixedPrecision) for cb in learn.cbs) == 1  # still on the training learner


def test_checkpoint_heads_trains_exactly_like_the_default():
    "Recomputing the heads in the backward pass changes memory, not training: same keys, same weights after a step"
    from fastai.torch_core import set_seed
    from fastai_cds.heads import CheckpointedSequential
    learners = []
    for ck in (False, True):
        set_seed(0)
        learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(),
                               cbs=[CDSCallback(view2_tfms=[], checkpoint_heads=ck, verbose=False), Spy(after_step=stop)]))
        learners.append(learn)
    a, b = learners
    assert all(isinstance(h[0], CheckpointedSequential) for h in b.model.heads) and len(b.model.heads[0][0]) > 0
    assert list(a.model.state_dict()) == list(b.model.state_dict())
    b.model.load_state_dict(a.model.state_dict())
    before = snapshot(a.model)
    for learn in learners:
        set_seed(1)
        learn.fit(1)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)
    assert not torch.equal(before['heads.0.0.0.1.weight'], a.model.state_dict()['heads.0.0.0.1.weight'])  # the step trained the heads
