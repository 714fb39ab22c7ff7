"""Tests of `fastai_cds.stage_distill` (FitNet, AT, SP) and of the stage plumbing they share (`FeatureDistillCallback`,
`pair_stages` in `fastai_cds.distill`): each loss against a float64 implementation written here from the reference's
definition (RepDistiller), gradients included; each callback inside a real fastai batch against a hand computation
from the captured stage outputs; stage pairing; hooks; bad input raising before the first step and leaving nothing."""
import copy
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.callback.core import CancelFitException
from fastai.layers import ConvLayer, Flatten
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat

from fastai_cds.cds import CDSCallback
from fastai_cds.distill import FeatureDistillCallback, KDCallback, pair_stages
from fastai_cds.model import DeepSupervisionModel
from fastai_cds.stages import StageInfo
from fastai_cds.stage_distill import (ATCallback, FitNetCallback, SPCallback, attention_loss, hint_loss, hint_regressor,
                                      similarity_loss)

from helpers import Spy, hooked_modules, no_bar, small_dls, snapshot, stop, tiny_cnn

pytestmark = pytest.mark.usefixtures("seeded")
T_WIDTHS = (16, 32, 64)


@pytest.fixture(scope="module")
def sdls():
    "32 digits to train, batches of 16 (shared: building DataLoaders costs more than a batch)"
    return small_dls(n_train=32, bs=16)


def teacher_cnn(widths=T_WIDTHS, extra=False):
    "The teacher: tiny_cnn twice as wide (stages '0', '1', '2'); `extra`: a fourth stride-1 stage '3' at 2x2 before the pool"
    a, b, c = widths
    layers = [ConvLayer(1, a, stride=2), ConvLayer(a, b, stride=2), ConvLayer(b, c, stride=2)]
    if extra: layers.insert(1, ConvLayer(a, a, stride=2))  # a deeper teacher: 4 downsampling stages
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(c, 10))


def set_bn_stats(m, seed=0):
    "Non-trivial running statistics, so that eval-mode outputs differ from train-mode ones"
    g = torch.Generator().manual_seed(seed)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return m


def student(dls, cbs, widths=(8, 16, 32)):
    return no_bar(Learner(dls, tiny_cnn(widths=widths), loss_func=CrossEntropyLossFlat(), cbs=cbs))


# ---------------------------------------------------------------- float64 references (RepDistiller's definitions)
def ref_pool(f, hw):
    "Average pooling of (B, C, H, W) to `hw` by reshaping (sizes divide)"
    b, c, h, w = f.shape
    return f.reshape(b, c, hw[0], h // hw[0], hw[1], w // hw[1]).mean((3, 5))


def ref_at(s_maps, t_maps, p=2):
    "distiller_zoo/AT.py: at(f) = normalize(f^p mean over channels, flattened); (at_s - at_t)^2 mean; the larger map pooled"
    total = 0.
    for s, t in zip(s_maps, t_maps):
        s, t = s.double(), t.double()
        if s.shape[2] > t.shape[2]: s = ref_pool(s, t.shape[2:])
        elif t.shape[2] > s.shape[2]: t = ref_pool(t, s.shape[2:])
        at = lambda f: (lambda a: a / a.pow(2).sum(1, keepdim=True).sqrt())(f.pow(p).mean(1).reshape(len(f), -1))
        total = total + (at(s) - at(t)).pow(2).sum() / (s.shape[0] * s.shape[2] * s.shape[3])
    return total


def ref_sp(s_maps, t_maps):
    "distiller_zoo/SP.py: G = f f^T, rows L2-normalised; ||G_t - G_s||_F^2 / B^2"
    total = 0.
    for s, t in zip(s_maps, t_maps):
        def g(f):
            f = f.double().reshape(len(f), -1)
            G = f @ f.T
            return G / G.pow(2).sum(1, keepdim=True).sqrt()
        total = total + (g(t) - g(s)).pow(2).sum() / len(s) ** 2
    return total


def ref_regressor(reg, x):
    "The FitNet regressor (conv, BatchNorm on the batch's statistics, ReLU) in float64 from its weights"
    conv, bn = reg[0], reg[1]
    w, b = conv.weight.detach().double(), conv.bias.detach().double()
    if isinstance(conv, nn.ConvTranspose2d): y = F.conv_transpose2d(x, w, b, stride=conv.stride, padding=conv.padding)
    else: y = F.conv2d(x, w, b, stride=conv.stride, padding=conv.padding)
    mu, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mu) / (var + bn.eps).sqrt() * bn.weight.detach().double()[None, :, None, None] + bn.bias.detach().double()[None, :, None, None]
    return y.clamp(min=0)


def ref_fitnet(reg, s, t):
    "HintLoss: MSE of the regressed student map to the teacher's"
    r = ref_regressor(reg, s.double())
    return (r - t.double()).pow(2).sum() / r.numel()


# ---------------------------------------------------------------- 1. the losses on fixed tensors, values and gradients
def test_attention_loss_equals_reference_with_gradients():
    "Two pairs, one with a student map twice the teacher's size (pooled); gradients w.r.t. both student maps"
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 6, 4, 4, generator=g)]
    t = [torch.randn(3, 5, 4, 4, generator=g), torch.randn(3, 7, 4, 4, generator=g)]
    s1 = [x.clone().requires_grad_() for x in s]
    s2 = [x.double().requires_grad_() for x in s]
    got, exp = attention_loss(s1, t), ref_at(s2, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-8)
    got.backward(); exp.backward()
    for a, b in zip(s1, s2): torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-8)
    assert all(x.grad.abs().sum() > 0 for x in s1)


def test_similarity_loss_equals_reference_with_gradients():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 9, 2, 2, generator=g)
    s1, s2 = s.clone().requires_grad_(), s.double().requires_grad_()
    got, exp = similarity_loss([s1], [t]), ref_sp([s2], [t])
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-9)
    got.backward(); exp.backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize('hs,ht', [(8, 8), (8, 4), (4, 8), (6, 4)])
def test_hint_regressor_and_loss_equal_reference_with_gradients(hs, ht):
    "RepDistiller's ConvReg cases: equal (1x1), twice (3x3 s2), half (transposed 4x4 s2), larger (kernel 1+hs-ht)"
    g = torch.Generator().manual_seed(2)
    reg = hint_regressor(StageInfo('s', 4, (hs, hs), 1), StageInfo('t', 6, (ht, ht), 1))
    s, t = torch.randn(3, 4, hs, hs, generator=g), torch.randn(3, 6, ht, ht, generator=g)
    s1, s2 = s.clone().requires_grad_(), s.double().requires_grad_()
    got, exp = hint_loss(reg(s1), t), ref_fitnet(reg, s2, t)
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-7)
    got.backward(); exp.backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)


def test_losses_are_fp32_under_autocast():
    s, t = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for v in (attention_loss([s], [t]), similarity_loss([s], [t]), hint_loss(s, t)): assert v.dtype == torch.float32


# ---------------------------------------------------------------- 2. pairing by relative depth
def test_pair_stages_by_relative_depth():
    "Against the stated rule: each stage of the shorter list with the first stage of the longer at or past its relative depth"
    for ns in range(1, 7):
        for nt in range(1, 7):
            short, long_ = min(ns, nt), max(ns, nt)
            exp = [(i, next(j for j in range(long_) if Fraction(j + 1, long_) >= Fraction(i + 1, short))) for i in range(short)]
            if ns > nt: exp = [(j, i) for i, j in exp]
            got = pair_stages(ns, nt)
            assert got == exp, (ns, nt)
            assert got[-1] == (ns - 1, nt - 1) and len({a for a, _ in got}) == len({b for _, b in got}) == len(got)
    with pytest.raises(ValueError, match='both networks need a stage'): pair_stages(0, 3)


def test_stage_pairs_of_a_deeper_teacher_and_explicit_pairs(sdls):
    "3 student stages, 4 teacher stages: AT pairs by relative depth; FitNet's hint is the second pair; SP the last; pairs= wins"
    t = teacher_cnn(extra=True)
    names = lambda cb: [(a.name, b.name) for a, b in cb.stage_pairs]
    at = ATCallback(t, verbose=False)
    student(sdls, at)
    assert names(at) == [('0', '1'), ('1', '2'), ('2', '3')]
    fit = FitNetCallback(t, verbose=False)
    learn = student(sdls, fit)
    assert names(fit) == [('1', '2')]
    reg = learn.model.aux['fitnet'][0]  # student '1' (16 x 4 x 4) to teacher '2' (32 x 2 x 2): 3x3 stride 2, sized from the stages
    assert (type(reg[0]), reg[0].in_channels, reg[0].out_channels, reg[0].stride) == (nn.Conv2d, 16, 32, (2, 2))
    sp = SPCallback(t, verbose=False)
    student(sdls, sp)
    assert names(sp) == [('2', '3')]
    at = ATCallback(t, pairs=[(0, 0), (-1, -1)], verbose=False)
    student(sdls, at)
    assert names(at) == [('0', '0'), ('2', '3')]


# ---------------------------------------------------------------- 3. the callbacks in a real batch
class Capture:
    "Forward hooks keeping the last output (float64) and input of named modules"
    def __init__(self): self.hs, self.out, self.inp = [], {}, {}
    def add(self, name, m):
        def f(mod, i, o):
            self.out[name] = o.detach().as_subclass(torch.Tensor).double().clone()
            self.inp[name] = i[0].detach().as_subclass(torch.Tensor).clone()
        self.hs.append(m.register_forward_hook(f))
    def remove(self):
        for h in self.hs: h.remove()


def one_batch(learn, teacher, stages=('0', '1', '2')):
    "One training batch; the student's and teacher's stage outputs, labels, the loss and a copy of the adapters"
    plain = learn.model.model if isinstance(learn.model, DeepSupervisionModel) else learn.model
    cap = Capture()
    cap.add('s_out', plain); cap.add('t_out', teacher)
    for n in stages: cap.add(f's{n}', plain.get_submodule(n)); cap.add(f't{n}', teacher.get_submodule(n))
    got = {}
    def after_loss():
        got.update(loss=learn.loss_grad.detach().double(), pred=learn.pred.detach().double(),
                   aux=copy.deepcopy(learn.model.aux) if isinstance(learn.model, DeepSupervisionModel) else None)
    learn.add_cbs([Spy(-30, before_batch=lambda: got.update(y=learn.y.as_subclass(torch.Tensor).clone())),
                   Spy(100, after_loss=after_loss, after_batch=stop)])
    try: learn.fit(1, 1e-3)
    finally: cap.remove()
    return cap, got


def ref_ce(logits, y):
    logits = logits.double()
    return (logits.logsumexp(1) - logits[torch.arange(len(y)), y]).mean()


@pytest.mark.parametrize('method', ['fitnet', 'at', 'sp'])
def test_callback_loss_equals_hand_computation(sdls, method):
    "Alone (no CDS): CE + weight x the method's term on the captured stage outputs, defaults RepDistiller's; the teacher in eval mode"
    t = set_bn_stats(teacher_cnn())
    cb = {'fitnet': FitNetCallback, 'at': ATCallback, 'sp': SPCallback}[method](t, verbose=False)
    learn = student(sdls, cb)
    cap, got = one_batch(learn, t)
    torch.testing.assert_close(cap.inp['t_out'], cap.inp['s_out'])  # the teacher saw the student's batch
    s = [cap.out[f's{n}'] for n in '012']
    tt = [cap.out[f't{n}'] for n in '012']
    with torch.no_grad(): t_eval = copy.deepcopy(t).eval()(cap.inp['t_out']).double()
    torch.testing.assert_close(cap.out['t_out'], t_eval)  # eval mode (RepDistiller), running statistics
    ce = ref_ce(got['pred'], got['y'])
    if method == 'fitnet': term, w = ref_fitnet(got['aux']['fitnet'][0], s[1], tt[1]), 100.
    elif method == 'at': term, w = ref_at(s, tt), 1000.
    else: term, w = ref_sp(s[2:], tt[2:]), 3000.
    torch.testing.assert_close(got['loss'], ce + w * term, rtol=1e-4, atol=1e-5)
    hist = learn.loss_terms.history
    assert set(hist) == {'ce', method} and abs(float(hist[method][0]) - term.item()) <= 1e-4 * max(1e-3, term.item())


def test_terms_reach_the_student_stages_and_teacher_gets_no_gradient(sdls):
    "The hooks keep the graph: AT's term alone moves the first stage's weights; the teacher gets no gradient"
    t = teacher_cnn()
    learn = student(sdls, ATCallback(t, verbose=False))
    w = learn.model[0][0].weight
    grads = {}
    def after_loss():
        ce = F.cross_entropy(learn.pred.float(), grads['y'])
        grads['total'], = torch.autograd.grad(learn.loss_grad, w, retain_graph=True)
        grads['ce'], = torch.autograd.grad(ce, w, retain_graph=True)
    learn.add_cbs([Spy(-30, before_batch=lambda: grads.update(y=learn.y.as_subclass(torch.Tensor).long())),
                   Spy(100, after_loss=after_loss, after_batch=stop)])
    learn.fit(1, 1e-3)
    assert (grads['total'] - grads['ce']).abs().sum() > 1e-6
    assert all(p.grad is None for p in t.parameters())


def test_with_cds_the_methods_read_view1_and_compose(sdls):
    "CDS + AT + KD: the forward runs both views, AT reads view 1 only; 'ce' recorded once, by CDS; the terms add up"
    t = teacher_cnn()
    learn = student(sdls, [CDSCallback(verbose=False), ATCallback(t, verbose=False), KDCallback(t)])
    cap, got = one_batch(learn, t)
    n = len(got['y'])
    assert cap.inp['s_out'].shape[0] == 2 * n and cap.inp['t_out'].shape[0] == n  # student: both views; teacher: view 1
    torch.testing.assert_close(cap.inp['t_out'], cap.inp['s_out'][:n])
    terms = {k: float(v[0]) for k, v in learn.loss_terms.history.items()}
    assert sorted(terms) == ['at', 'ce', 'contra_0', 'contra_1', 'contra_2', 'kd']
    at = ref_at([cap.out[f's{k}'][:n] for k in '012'], [cap.out[f't{k}'] for k in '012'])
    assert abs(terms['at'] - at.item()) < 1e-4 * at.item()
    exp = terms['ce'] + 0.1 * sum(terms[f'contra_{i}'] for i in range(3)) + terms['kd'] + 1000 * terms['at']
    assert abs(got['loss'].item() - exp) < 1e-4 * exp


# ---------------------------------------------------------------- 4. hooks: for the training epochs only, gone whatever happens
def test_hooks_only_during_training_epochs_and_removed_after_an_error(sdls):
    t = teacher_cnn()
    learn = student(sdls, SPCallback(t, verbose=False))
    seen = {}
    learn.fit(1, 1e-3, cbs=Spy(100, after_batch=lambda: seen.setdefault('train', hooked_modules(learn.model)),
                              after_validate=lambda: seen.setdefault('valid', hooked_modules(learn.model))))
    assert seen['train'] == ['2'] and seen['valid'] == []  # SP's last stage, in training batches only
    assert hooked_modules(learn.model) == [] and hooked_modules(t) == [] and '_do_epoch_train' not in vars(learn)
    def boom(): raise RuntimeError('boom')
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, 1e-3, cbs=Spy(100, after_pred=boom))
    assert hooked_modules(learn.model) == [] and hooked_modules(t) == []
    before = snapshot(learn.model)
    learn.fit(1, 1e-3, cbs=Spy(100, after_batch=stop))  # a fit after the error trains as before
    assert any(not torch.equal(v, snapshot(learn.model)[k]) for k, v in before.items())
    assert '_do_epoch_train' not in vars(learn) and hooked_modules(learn.model) == []


# ---------------------------------------------------------------- 5. bad input: an error before the first step, nothing left
class Stepped(Exception): pass


def mlp():
    "A teacher without feature maps: no stage to find"
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))


BAD = {
    'teacher without stages': (lambda: FitNetCallback(mlp()), "FitNetCallback: the teacher's stages: find_stages found no usable stages"),
    'teacher without the named stage': (lambda: ATCallback(teacher_cnn(), teacher_layers=['0', '7']), "ATCallback: the teacher's stages: No module named '7'"),
    'hint beyond the pairs': (lambda: FitNetCallback(teacher_cnn(), hint=3), r"FitNetCallback: hint=3, but the student and the teacher pair 3 stages"),
    'pairs out of range': (lambda: SPCallback(teacher_cnn(), pairs=[(0, 4)]), r"the pairs \[\(0, 4\)\] name stages that are not there: the student has 3 stages \['0', '1', '2'\], the teacher 3"),
    'mismatched stage counts': (lambda: ATCallback(teacher_cnn(), layers=['1', '2'], teacher_layers=['0', '1', '2']), 'layers names 2 student stages and teacher_layers 3'),
    'malformed pairs': (lambda: ATCallback(teacher_cnn(), pairs=[0, 1]), r'pairs must be a non-empty list of \(student stage index, teacher stage index\)'),
    'no regressor': (lambda: FitNetCallback(teacher_cnn(), pairs=[(2, 0)]), 'FitNet: no regressor'),
}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_raises_before_the_first_step_and_leaves_nothing(sdls, case):
    make, match = BAD[case]
    model = tiny_cnn(widths=(8, 16, 32))
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=match): Learner(sdls, model, loss_func=CrossEntropyLossFlat(), cbs=make())
    assert hooked_modules(model) == [] and list(model.state_dict()) == keys
    # joining at fit: the same error when fit starts, before a step; the learner as it was
    learn = no_bar(Learner(sdls, model, loss_func=CrossEntropyLossFlat()))
    before, train_dl = snapshot(model), sdls.train
    def stepped(): raise Stepped()
    with pytest.raises(ValueError, match=match): learn.fit(1, 1e-3, cbs=[make(), Spy(100, before_batch=stepped)])
    assert learn.model is model and learn.dls is sdls and sdls.train is train_dl
    assert hooked_modules(model) == [] and '_do_epoch_train' not in vars(learn)
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items()) and list(model.state_dict()) == keys


def test_bad_weights():
    with pytest.raises(ValueError, match='ATCallback: weight must be >= 0'): ATCallback(teacher_cnn(), weight=-1)


def test_under_cpu_bf16_autocast_the_terms_are_fp32(sdls):
    "Under bf16 autocast the stage outputs are bf16; the regressor and the terms compute in fp32"
    from fastai_cds.precision import DeviceMixedPrecision
    t = teacher_cnn()
    learn = student(sdls, [FitNetCallback(t, verbose=False), ATCallback(t, verbose=False), DeviceMixedPrecision()])
    dtypes = {}
    h = learn.model.model[1].register_forward_hook(lambda m, i, o: dtypes.update(stage=o.dtype))
    try: learn.fit(1, 1e-3, cbs=Spy(100, after_batch=stop))
    finally: h.remove()
    assert dtypes['stage'] == torch.bfloat16
    hist = learn.loss_terms.history
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for k in ('fitnet', 'at') for v in hist[k])
