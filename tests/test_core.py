"""Tests of `fastai_cds.core`: what every deep-supervision callback shares, inside real fastai training loops
(with `CDSCallback` as the concrete callback): `LossTerms`, interrupted fits, hook cleanup, the optimizer and its
hyper-parameters, save/load, fastai's entry points, architectures, low precision."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle/fine_tune/lr_find)
from fastai.callback.core import Callback, CancelBatchException
from fastai.layers import Flatten
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.vision.learner import vision_learner

from fastai_cds.baselines import DSNCallback
from fastai_cds.cds import CDSCallback
from fastai_cds.core import FiniteLossCallback, LossTermCallback, LossTerms, add_loss_terms, set_loss
from fastai_cds.model import DeepSupervisionModel
from fastai_cds.precision import DeviceMixedPrecision

from helpers import (Spy, count_calls, hooked_modules, is_bn, manual_valid, no_bar, param_snapshot, small_dls, snapshot,
                     stop, tiny_cnn, tiny_learner)

pytestmark = pytest.mark.usefixtures('seeded')  # set_seed(0) before every test (conftest.py)


# ---------------------------------------------------------------- 1. LossTerms and LossTermCallback
class L2Term(LossTermCallback):
    "A minimal loss-term callback: the learner's loss + `w` x the mean squared logit, recorded as 'l2'"
    order, term_names = 0, ['l2']
    def __init__(self, w=0.5, companions=()): self.w, self.terms, self.companions = w, {}, list(companions)
    def after_loss(self):
        if not self.training: return
        l2 = self.pred.float().pow(2).mean()
        set_loss(self, self.loss_grad + self.w * l2, {'l2': l2})


def test_loss_term_callback_adds_loss_terms_and_records_its_terms():
    dls = small_dls()
    learn = no_bar(Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=L2Term()))
    assert sum(isinstance(cb, LossTerms) for cb in learn.cbs) == 1  # joining, it brought LossTerms
    assert add_loss_terms(learn) is learn.loss_terms and sum(isinstance(cb, LossTerms) for cb in learn.cbs) == 1
    got = []
    learn.add_cb(Spy(100, after_loss=lambda: learn.training and got.append(
        (learn.pred.detach().double(), learn.y.clone(), learn.loss_grad, learn.loss))))
    learn.fit(2, 1e-3)
    assert len(got) == 2 * len(dls.train) == 8
    for pred, y, loss_grad, loss in got:
        exp = F.cross_entropy(pred, y.as_subclass(torch.Tensor)) + 0.5 * pred.pow(2).mean()
        assert abs(loss_grad.item() - exp.item()) < 1e-5 and loss_grad.requires_grad
        assert torch.equal(loss, loss_grad.detach()) and not loss.requires_grad  # what is logged is the same number
    hist = learn.loss_terms.history['l2']
    assert len(hist) == 8 and not any(t.requires_grad for t in hist)
    for (pred, *_), t in zip(got, hist): assert abs(float(t) - pred.pow(2).mean().item()) < 1e-5
    # epoch means in the Recorder, before 'time'
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'valid_loss', 'l2', 'time']
    for e in range(2):
        mean = sum(float(t) for t in hist[4 * e:4 * e + 4]) / 4
        assert abs(learn.recorder.values[e][-1] - mean) < 1e-6


def test_companions_join_and_leave_with_their_callback():
    friend = Spy(7)
    cb = L2Term(companions=[friend])
    learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=cb))
    assert friend in learn.cbs and friend.learn is learn
    learn.remove_cb(cb)
    assert friend not in learn.cbs and cb not in learn.cbs
    learn.add_cb(cb)
    assert sum(c is friend for c in learn.cbs) == 1


# ---------------------------------------------------------------- 2. the wrapped model and the checks at creation
def test_creation_wraps_the_model_and_rejects_a_wrapped_one():
    dls = small_dls()
    plain = tiny_cnn()
    learn = no_bar(Learner(dls, plain, loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)))
    assert isinstance(learn.model, DeepSupervisionModel) and learn.model.model is plain and learn.cds.ds is learn.model
    assert learn.model.stages == ['0', '1', '2'] and not learn.model.armed and hooked_modules(learn.model) == []
    with pytest.raises(ValueError, match=r"already carries deep-supervision heads.*pass the plain model, `learn.model.model`"):
        Learner(dls, learn.model, loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False))
    # the plain model of a trained learner is fine
    again = Learner(dls, learn.model.model, loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False))
    assert again.model.model is plain


def test_two_deep_supervision_callbacks_are_named_as_such():
    for cbs in ([CDSCallback(verbose=False), CDSCallback(verbose=False)], [CDSCallback(verbose=False), DSNCallback(verbose=False)]):
        with pytest.raises(ValueError, match=r"two deep-supervision callbacks \(\w+Callback and \w+Callback\).*use one per Learner"):
            Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=cbs)


def test_a_training_set_smaller_than_a_batch_names_bs():
    dls = small_dls(n_train=6, bs=8)
    plain = tiny_cnn()
    with pytest.raises(ValueError, match=r"the training DataLoader has no batch: its 6 items make no batch of bs=8 with drop_last=True: "
                                         r"pass a smaller bs"):
        Learner(dls, plain, loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False))
    assert hooked_modules(plain) == []


def test_a_nan_image_stops_the_run_at_its_batch_before_anything_changes():
    "A NaN planted in the 3rd training batch: the fit stops there, naming it; the model is as after batch 2; no hook is left"
    learn = no_bar(Learner(small_dls(n_train=48), tiny_cnn(), loss_func=CrossEntropyLossFlat(),
                           cbs=[CDSCallback(verbose=False), FiniteLossCallback()]))
    after = []
    plant = Spy(-10, before_batch=lambda: learn.training and learn.iter == 2 and setattr(learn, 'xb', (learn.xb[0].clone().fill_(float('nan')),)))
    keep = Spy(after_step=lambda: after.append(snapshot(learn.model)))
    with pytest.raises(FloatingPointError, match=r"Training batch 3 of epoch 1 holds NaN or infinite inputs: training stopped before its forward"):
        learn.fit(1, 1e-2, cbs=[plant, keep])
    assert len(after) == 2
    for k, v in snapshot(learn.model).items(): assert torch.equal(v, after[-1][k]), k  # parameters and BatchNorm statistics
    assert hooked_modules(learn.model) == [] and not learn.model.armed


def test_a_non_finite_loss_stops_the_run_naming_its_terms():
    "The learner's loss (`ce`) turns NaN at the 2nd batch: the fit stops before its backward, naming the term"
    calls = []
    def loss(p, y):
        calls.append(1)
        return F.cross_entropy(p, y) * (float('nan') if len(calls) == 2 else 1.)
    learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=loss, cbs=[CDSCallback(verbose=False), FiniteLossCallback()]))
    steps = []
    with pytest.raises(FloatingPointError, match=r"The loss of training batch 2 of epoch 1 is nan \(ce nan, contra_0 [0-9.]+.*\); "
                                                  r"not finite: ce\. Training stopped before this batch's step"):
        learn.fit(1, 1e-2, cbs=Spy(after_step=lambda: steps.append(1)))
    assert steps == [1]
    calls.clear()
    plain = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=loss, cbs=FiniteLossCallback()))
    with pytest.raises(FloatingPointError, match=r"\(no loss terms recorded: it is the learner's loss\)"): plain.fit(1)


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


def test_batch_size_1_rejected_at_fit_start():
    learn = tiny_learner(small_dls(n_train=8, n_valid=4, bs=1))
    n = [0]
    learn.add_cb(Spy(before_batch=lambda: n.__setitem__(0, n[0] + 1)))
    with pytest.raises(ValueError, match='batch size of at least 2'): learn.fit(1)
    assert n[0] == 0


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


def test_joining_after_the_optimizer_exists_keeps_hyper_parameters_frozen_groups_and_state():
    "A callback added to a learner that already trained: the optimizer is rebuilt with the heads, nothing else changes"
    split = lambda m: [list(m[:2].parameters()), list(m[2:].parameters())]
    learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(), splitter=split))
    plain = learn.model
    learn.freeze_to(1)  # group 0 frozen (its BatchNorm still trains: train_bn)
    learn.opt.set_hyper('eps', [1e-6, 1e-4])  # values a fresh optimizer would not have, one per group
    learn.opt.set_hyper('mom', 0.8)
    learn.fit(1, 1e-3, cbs=Spy(100, after_batch=stop))  # one step: Adam state for the trainable parameters
    old_opt = learn.opt
    body = [p for p in plain[2:].parameters()]
    state = {id(p): {k: v.clone() for k, v in old_opt.state[p].items() if isinstance(v, torch.Tensor)} for p in body}
    assert all('grad_avg' in s for s in state.values())
    frozen = [plain[0][0].weight, plain[1][0].weight]  # the convs of group 0
    frozen0 = [p.detach().clone() for p in frozen]

    learn.add_cb(CDSCallback(verbose=False))
    seen = {}
    def at_first_batch():
        if seen: return
        opt = learn.opt
        seen.update(opt=opt, hypers=[dict(h) for h in opt.hypers], frozen_idx=opt.frozen_idx,
                    requires_grad=[p.requires_grad for p in frozen],
                    state={id(p): {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in body},
                    last=[id(p) for p in opt.param_lists[-1]])
    learn.fit(1, 2e-3, cbs=Spy(100, before_batch=at_first_batch, after_batch=stop))
    ds = learn.model
    assert isinstance(ds, DeepSupervisionModel) and ds.model is plain
    assert seen['opt'] is not old_opt and seen['frozen_idx'] == 1 and seen['requires_grad'] == [False, False]
    assert [h['eps'] for h in seen['hypers']] == [1e-6, 1e-4] and all(h['mom'] == 0.8 for h in seen['hypers'])
    assert all(h['lr'] == 2e-3 for h in seen['hypers'])  # this fit's learning rate
    for p in body:
        for k, v in state[id(p)].items(): assert torch.equal(seen['state'][id(p)][k], v), k
    head_ps = list(ds.heads.parameters())
    assert head_ps and {id(p) for p in head_ps} <= set(seen['last'])
    for p, p0 in zip(frozen, frozen0): assert torch.equal(p.detach(), p0)  # frozen: no step
    assert any(learn.opt.state[p].get('grad_avg') is not None for p in head_ps)  # the heads stepped


# the hyper-parameters a user gives to fastai's entry points are the ones the optimizer steps with, whether the callback
# came with the Learner, with the call (`cbs=`) or by `add_cb`: when it joins at fit time the heads (and the adapters of
# distillation) are attached in `before_fit`, after fastai set the hyper-parameters of an optimizer made without them
def _two_groups(m):
    return [list(m[:2].parameters()), list(m[2:].parameters())]


def _cos(start, end, pos):
    "fastai's cosine annealing from `start` to `end`, written out"
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def _one_cycle(lr_max, pct, pct_start=0.25, div=25., div_final=1e5):
    "The one-cycle learning rate at `pct` of training: warm up from lr_max/div, then anneal to lr_max/div_final"
    if pct < pct_start: return _cos(lr_max / div, lr_max, pct / pct_start)
    return _cos(lr_max, lr_max / div_final, (pct - pct_start) / (1 - pct_start))


def _expected_steps(entry, n_iter, lr, wd):
    "Per optimizer step of every fit the call runs: [(lr, wd) of group 0, (lr, wd) of group 1]"
    if entry == 'fit': return [[(lr, wd), (lr, wd)]] * n_iter
    if entry == 'fit_one_cycle': return [[(_one_cycle(lr, i / n_iter), wd)] * 2 for i in range(n_iter)]
    # fine_tune(1, lr, freeze_epochs=1): one cycle on slice(lr) (groups lr/10, lr) with pct_start 0.99, then one on
    # slice(lr/2/100, lr/2) with pct_start 0.3 and div 5
    frozen = [[(_one_cycle(g, i / n_iter, pct_start=0.99), wd) for g in (lr / 10, lr)] for i in range(n_iter)]
    return frozen + [[(_one_cycle(g, i / n_iter, pct_start=0.3, div=5.), wd) for g in (lr / 200, lr / 2)] for i in range(n_iter)]


class StepWatch(Callback):
    "Before every optimizer step: the (lr, wd) of each parameter group, and whether every trainable parameter is in the optimizer"
    order = 100
    def __init__(self): self.steps, self.covered = [], []
    def before_step(self):
        opt = self.learn.opt
        self.steps.append([(h['lr'], h['wd']) for h in opt.hypers])
        in_opt = {id(p) for p in opt.all_params(with_grad=False).itemgot(0)}
        self.covered.append(all(id(p) in in_opt for p in self.learn.model.parameters() if p.requires_grad))


@pytest.fixture(scope='module')
def teacher():
    return tiny_learner(small_dls(n_train=16, n_valid=8))


CALLBACKS = {'cds': lambda t: CDSCallback(verbose=False), 'cds_teacher': lambda t: CDSCallback(verbose=False, teacher=t),
             'dsn': lambda t: DSNCallback(verbose=False)}


@pytest.mark.parametrize('cb', list(CALLBACKS))
@pytest.mark.parametrize('joins', ['construction', 'cbs', 'add_cb'])
@pytest.mark.parametrize('entry', ['fit', 'fit_one_cycle', 'fine_tune'])
def test_hyper_parameters_given_to_fit_are_the_ones_the_optimizer_uses(entry, joins, cb, teacher):
    dls = small_dls(n_train=16, n_valid=8)  # 2 batches per epoch
    callback = CALLBACKS[cb](teacher)
    learn = no_bar(Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), splitter=_two_groups,
                           cbs=callback if joins == 'construction' else None))
    if joins == 'add_cb': learn.add_cb(callback)
    watch = StepWatch()
    lr, wd = 0.05, 0.3
    cbs = [watch, callback] if joins == 'cbs' else [watch]
    if entry == 'fit': learn.fit(1, lr=lr, wd=wd, cbs=cbs)
    elif entry == 'fit_one_cycle': learn.fit_one_cycle(1, lr_max=lr, wd=wd, cbs=cbs)
    else: learn.fine_tune(1, base_lr=lr, freeze_epochs=1, wd=wd, cbs=cbs)
    assert isinstance(learn.model, DeepSupervisionModel) and len(learn.model.heads)  # the heads trained ...
    if cb == 'cds_teacher': assert len(learn.model.aux['distill'])  # ... and the adapters
    expected = _expected_steps(entry, len(dls.train), lr, wd)
    assert len(watch.steps) == len(expected)
    for got, exp in zip(watch.steps, expected):
        assert [w for _, w in got] == [w for _, w in exp]
        assert [l for l, _ in got] == pytest.approx([l for l, _ in exp], rel=1e-6)
    assert all(watch.covered)


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
    for h in hs: h.remove()
    assert learn.model.armed is False and learn.model.read() is None
    assert hooked_modules(learn.model) == []


def test_stage_hooks_only_around_the_training_batches():
    "The stage hooks are registered for the training batches of a fit, not for validation, and the heads run on training batches only"
    learn = tiny_learner(small_dls())
    stage = learn.model.model.get_submodule(learn.cds.stages[0].name)
    seen = []
    watch = lambda: seen.append((learn.training, bool(stage._forward_hooks), learn.model.armed))
    learn.add_cb(Spy(0, before_batch=watch))
    learn.fit(1)
    assert [s for s in seen if s[0]] == [(True, True, True)] * 4  # armed by CDSCallback (-5), inside the hooks
    assert [s for s in seen if not s[0]] == [(False, False, False)] * 2
    assert hooked_modules(learn.model) == [] and 'all_batches' not in vars(learn)


# ---------------------------------------------------------------- 6. cancellation and errors leave no trace
class Boom(RuntimeError): pass


def _raise(ex):
    raise ex


def assert_plain_again(learn):
    "No hook anywhere in the model, disarmed, and in eval mode its forward on a validation batch is the plain model's"
    ds = learn.model
    assert hooked_modules(ds) == [] and ds.armed is False
    x = learn.dls.valid.one_batch()[0]
    ds.eval()
    with torch.no_grad():
        out = ds(x)
        h = x
        for layer in ds.model.children(): h = layer(h)  # the plain model, layer by layer
    assert out.shape == h.shape == (len(x), 10)
    torch.testing.assert_close(out, h, rtol=0, atol=0)
    assert ds.read() is None


@pytest.mark.parametrize('event', ['before_batch', 'after_pred', 'after_loss'])
@pytest.mark.parametrize('order', [-10, 10])  # before or after CDSCallback's own (-5)
@pytest.mark.parametrize('exc', [KeyboardInterrupt, CancelBatchException])
def test_interrupt_or_cancel_by_another_callback_leaves_the_plain_model(exc, order, event):
    learn = tiny_learner(small_dls(n_train=32, bs=8))
    raised, steps = [], []
    def maybe():
        if learn.training and learn.iter == 1:
            raised.append(learn.iter)
            raise exc()
    learn.add_cbs([Spy(order, **{event: maybe}), Spy(100, after_batch=lambda: learn.training and steps.append(learn.iter))])
    if exc is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt): learn.fit(1)
        assert steps == [0]
    else:
        learn.fit(1)  # the batch is cancelled, the fit goes on and ends
        assert steps == [0, 1, 2, 3] and len(learn.recorder.values) == 1
    assert raised == [1]
    assert_plain_again(learn)


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
    assert hooked_modules(ds) == []
    assert learn.dls.train.after_batch is tfms_before and list(learn.dls.train.after_batch.fs) == fs_before
    assert ds.armed is False
    logits, ys = manual_valid(learn)
    loss = learn.validate()[0]
    assert abs(loss - F.cross_entropy(logits, ys).item()) < 1e-5
    assert ds.armed is False and hooked_modules(ds) == []


@pytest.mark.parametrize('exc', [KeyboardInterrupt, Boom])
def test_removing_the_callback_after_an_interrupted_fit_leaves_a_learner_that_fits(exc):
    learn = tiny_learner(small_dls(n_train=32, bs=8))
    spy = Spy(0, after_pred=lambda: learn.training and learn.iter == 1 and _raise(exc('x')))
    learn.add_cb(spy)
    with pytest.raises(exc): learn.fit(1)
    learn.remove_cbs([spy, learn.cds])
    assert not any(isinstance(cb, CDSCallback) for cb in learn.cbs)
    learn.fit(1)  # a plain fit of the (still wrapped) model
    assert len(learn.recorder.values) == 1 and all(math.isfinite(v) for v in learn.recorder.values[-1])


# ---------------------------------------------------------------- 7. architectures
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


# ---------------------------------------------------------------- 8. low precision
def test_one_batch_under_cpu_bf16_autocast():
    "`DeviceMixedPrecision` on a CPU: the model and the heads run in bf16, the loss is fp32, the heads train"
    learn = tiny_learner(small_dls())
    learn.add_cb(DeviceMixedPrecision())
    dt = {}
    h = learn.model.model.register_forward_hook(lambda m, i, o: dt.update(pred=o.dtype))
    hh = learn.model.heads[0][0].register_forward_hook(lambda m, i, o: dt.update(head=o.dtype))
    got, before, after = _one_step(learn)
    h.remove(); hh.remove()
    assert dt['pred'] == dt['head'] == torch.bfloat16  # autocast was really on, for the model and the heads
    assert got['loss'].dtype == torch.float32
    _check_step(learn, got, before, after)
