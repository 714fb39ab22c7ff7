"""Tests of `fastai_cds.distill`: `DistillCallback` and its shorthand `CDSCallback(teacher=...)` (contrastive deep
distillation, paper eqs. 8-9) and `KDCallback` (also RepDistiller's) inside real fastai training loops, against hand
computations; the frozen teacher, left as given (no weight or buffer written, train mode included); adapters; the
paper's comparison methods each combined with CDS from one teacher; export of every student in a process where
fastai_cds cannot be imported; a teacher loaded from a file in a fresh process."""
import copy
import inspect
import json
import zipfile
import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.callback.core import CancelFitException
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed

from fastai_cds.cds import CDSCallback
from fastai_cds.distill import DistillCallback, Distiller, KDCallback, Teacher, TeacherCallback, load_teacher, reference_distillation
from fastai_cds.embedding_distill import CRDCallback, RKDCallback, item_index_dls
from fastai_cds.stage_distill import ATCallback, FitNetCallback, SPCallback
from fastai_cds.model import DeepSupervisionModel, Taps
from fastai_cds.precision import DeviceMixedPrecision

from helpers import (BLOCKED, Spy, is_bn, no_bar, ref_distance, ref_soft, ref_supcon, run_children, ours, small_dls,
                     snapshot, stop, tiny_cnn)

T_WIDTHS, S_WIDTHS = (16, 32, 64), (8, 16, 32)  # teacher / student stage widths: every adapter is a Linear(32, 64)
# The paper's comparison (Tables 7 and 8): every method as its tables combine it with CDS, from one teacher in train mode
# (BatchNorm on batch statistics: the setting that moved a teacher's running statistics before, issue 23)
COMPARISON = {
    'cds+distill': lambda t: [CDSCallback(teacher=t, verbose=False)],  # DistillCallback; train mode is its default
    'cds+kd': lambda t: [CDSCallback(verbose=False), KDCallback(t, teacher_bn_train=True)],
    'cds+fitnet': lambda t: [CDSCallback(verbose=False), FitNetCallback(t, teacher_bn_train=True, verbose=False)],
    'cds+at': lambda t: [CDSCallback(verbose=False), ATCallback(t, teacher_bn_train=True, verbose=False)],
    'cds+sp': lambda t: [CDSCallback(verbose=False), SPCallback(t, teacher_bn_train=True, verbose=False)],
    'cds+rkd': lambda t: [CDSCallback(verbose=False), RKDCallback(t, teacher_bn_train=True, verbose=False)],
    'cds+crd+kd': lambda t: [CDSCallback(verbose=False), CRDCallback(t, k=8, teacher_bn_train=True, verbose=False),
                             KDCallback.repdistiller(t, weight=1., ce_weight=1., teacher_bn_train=True)],
}
TERM = {'cds+distill': 'emb_0', 'cds+kd': 'kd', 'cds+fitnet': 'fitnet', 'cds+at': 'at', 'cds+sp': 'sp', 'cds+rkd': 'rkd', 'cds+crd+kd': 'crd'}


# ---------------------------------------------------------------- helpers
def make_dls():
    "64 digits to train, 16 to validate, batches of 16"
    return small_dls(n_train=64, bs=16)


def teacher_learner(dls=None, path='.'):
    "The teacher's Learner: a wider CNN with CDS heads (rebuilt identically in the fresh process)"
    return no_bar(Learner(dls if dls is not None else make_dls(), tiny_cnn(widths=T_WIDTHS),
                          loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False), path=path))


def student_learner(cbs, widths=S_WIDTHS, dls=None):
    return no_bar(Learner(dls if dls is not None else make_dls(), tiny_cnn(widths=widths), loss_func=CrossEntropyLossFlat(),
                          cbs=cbs))


def apply_adapter(a, s):
    "An adapter by hand: Linear -> s W^T + b, Identity -> s"
    if isinstance(a, nn.Linear): return s.double() @ a.weight.detach().double().T + a.bias.detach().double()
    assert isinstance(a, nn.Identity)
    return s.double()


class Capture:
    "Forward hooks storing the last output (and input) of modules: cleared by `remove`"
    def __init__(self):
        self.hs, self.out, self.inp, self.state = [], {}, {}, {}
    def add(self, name, module):
        def f(m, i, o):
            self.out[name] = o.detach().as_subclass(torch.Tensor).double().clone()
            self.inp[name] = i[0].detach().as_subclass(torch.Tensor).clone()
            self.state[name] = (m.training, torch.is_grad_enabled())
        self.hs.append(module.register_forward_hook(f))
    def remove(self):
        for h in self.hs: h.remove()


def capture_model(cap, prefix, ds):
    "Hooks on a DeepSupervisionModel's plain model, its stages, its heads and a BatchNorm"
    cap.add(f'{prefix}_out', ds.model)
    for k, (name, h) in enumerate(zip(ds.stages, ds.heads)):
        cap.add(f'{prefix}_stage{k}', ds.model.get_submodule(name))
        cap.add(f'{prefix}_head{k}', h)
    cap.add(f'{prefix}_bn', next(m for m in ds.model.modules() if is_bn(m)))


def run_one_batch(learn, teacher_ds):
    "One training batch of a distilling student; everything the hand computation needs"
    cap = Capture()
    capture_model(cap, 's', learn.model)
    capture_model(cap, 't', teacher_ds)
    got = {}
    learn.add_cbs([Spy(-10, before_batch=lambda: got.update(y=learn.y.as_subclass(torch.Tensor).clone())),
                   Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach().double(),
                                                          aux=copy.deepcopy(learn.model.aux['distill'])),
                       after_batch=stop)])
    try: learn.fit(1)
    finally: cap.remove()
    return cap, got


def expected_loss(cap, got, n_heads, emb_weight=0.1, logit_weight=1., T=3., squared=False, kl=False, features='heads',
                  idx=None):
    "CE(view 1) + 0.1 sum_h SupCon + emb_weight sum_h dist(t_idx(h), A_h(s_h)) + logit_weight soft(s view 1, t view 1)"
    y = got['y']
    n = len(y)
    idx = idx if idx is not None else list(range(n_heads))
    feat = (lambda p, k: cap.out[f'{p}_head{k}']) if features == 'heads' else (lambda p, k: cap.out[f'{p}_stage{k}'].mean((2, 3)))
    ce = F.cross_entropy(cap.out['s_out'][:n], y)
    contra = [ref_supcon(cap.out[f's_head{k}'], y) for k in range(n_heads)]
    emb = [ref_distance(apply_adapter(got['aux'][k], feat('s', k)), feat('t', i), squared) for k, i in enumerate(idx)]
    kd = ref_soft(cap.out['s_out'][:n], cap.out['t_out'][:n], T, kl)
    total = ce + 0.1 * sum(contra) + emb_weight * sum(emb) + logit_weight * kd
    return total, dict(ce=ce, kd=kd, **{f'contra_{k}': c for k, c in enumerate(contra)}, **{f'emb_{k}': e for k, e in enumerate(emb)})


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    "A CDS teacher trained one epoch (non-trivial BN statistics), saved with `learn.save`; its grads cleared"
    d = tmp_path_factory.mktemp("teacher")
    set_seed(0)
    t = teacher_learner(path=d)
    with t.no_logging(): t.fit(1, 1e-2)
    t.save('teacher')
    for p in t.model.parameters(): p.grad = None  # fastai's zero_grad leaves zero tensors; the student's fit must add none
    return t


@pytest.fixture
def teacher(trained_teacher):
    "A copy of the trained teacher for one test (a test that breaks the teacher breaks only its copy)"
    t = teacher_learner(path=trained_teacher.path)
    t.model.load_state_dict(trained_teacher.model.state_dict())
    return t


# ---------------------------------------------------------------- 1. the loss, switch by switch
CASES = {
    'reference': (lambda t: t, dict()),
    'paper': (lambda t: Distiller.paper(t), dict(squared=True, kl=True)),
    'imagenet': (lambda t: Distiller.imagenet(t), dict(emb_weight=0.5, logit_weight=1., T=1.)),
    'stages': (lambda t: Distiller(t, features='stages'), dict(features='stages')),
    'custom': (lambda t: Distiller(t, emb_weight=0.3, logit_weight=2., T=2., squared=True), dict(emb_weight=0.3, logit_weight=2., T=2., squared=True)),
}


@pytest.mark.parametrize('case', list(CASES))
def test_student_loss_equals_hand_computation(teacher, case):
    make, kw = CASES[case]
    set_seed(1)
    learn = student_learner(CDSCallback(teacher=make(teacher), verbose=False))
    aux = learn.model.aux['distill']
    if case == 'stages':  # pooled raw stage outputs: widths 8/16/32 -> 16/32/64
        assert [(a.in_features, a.out_features) for a in aux] == list(zip(S_WIDTHS, T_WIDTHS))
    else:  # head embeddings: the final width, 32 -> 64
        assert [(a.in_features, a.out_features) for a in aux] == [(32, 64)] * 3
    cap, got = run_one_batch(learn, teacher.model)
    n = len(got['y'])
    assert cap.inp['s_out'].shape[0] == 2 * n == 32
    torch.testing.assert_close(cap.inp['t_out'], cap.inp['s_out'])  # the teacher saw both views the student saw
    exp, terms = expected_loss(cap, got, 3, **kw)
    torch.testing.assert_close(got['loss'], exp, rtol=1e-5, atol=1e-4)
    # every term is recorded, unweighted, under its own name
    hist = learn.loss_terms.history
    assert set(hist) == {'ce', 'contra_0', 'contra_1', 'contra_2', 'emb_0', 'emb_1', 'emb_2', 'kd'}
    for k, v in terms.items():
        assert len(hist[k]) == 1
        assert abs(float(hist[k][0]) - v.item()) < 1e-4 * max(1., abs(v.item())), k
    # the switches really change the numbers on this batch (a formula that ignored them would not pass every case)
    if case == 'reference':
        s0 = apply_adapter(got['aux'][0], cap.out['s_head0'])
        assert abs(ref_distance(s0, cap.out['t_head0'], True).item() - terms['emb_0'].item()) > 1e-2
        assert abs(ref_soft(cap.out['s_out'][:n], cap.out['t_out'][:n], 3., True).item() - terms['kd'].item()) > 1e-2


def test_identity_adapters_when_widths_match(teacher):
    "A student as wide as the teacher gets no Linear adapter: the distance is taken directly"
    set_seed(1)
    learn = student_learner(CDSCallback(teacher=teacher, verbose=False), widths=T_WIDTHS)
    assert all(isinstance(a, nn.Identity) for a in learn.model.aux['distill']) and not list(learn.model.aux.parameters())
    cap, got = run_one_batch(learn, teacher.model)
    exp, _ = expected_loss(cap, got, 3)
    torch.testing.assert_close(got['loss'], exp, rtol=1e-5, atol=1e-4)


def test_teacher_heads_mapping(teacher):
    "Two student heads on stages '1', '2', matched to teacher heads 2 and 0 by `teacher_heads`"
    set_seed(1)
    learn = student_learner(CDSCallback(teacher=Distiller(teacher, teacher_heads=[2, 0]), layers=['1', '2'], verbose=False))
    assert learn.model.stages == ['1', '2'] and len(learn.model.aux['distill']) == 2
    cap, got = run_one_batch(learn, teacher.model)
    exp, terms = expected_loss(cap, got, 2, idx=[2, 0])
    torch.testing.assert_close(got['loss'], exp, rtol=1e-5, atol=1e-4)
    # not the one-to-one match
    assert abs(ref_distance(apply_adapter(got['aux'][0], cap.out['s_head0']), cap.out['t_head0'], False).item()
               - terms['emb_0'].item()) > 1e-3


def test_one_batch_under_cpu_bf16_autocast(teacher):
    "The teacher runs inside the student's autocast; the distillation terms come out in fp32, close to the fp64 reference"
    set_seed(1)
    learn = student_learner(CDSCallback(teacher=teacher, verbose=False))
    learn.add_cb(DeviceMixedPrecision())
    dtypes = {}
    h = teacher.model.heads[0][0].register_forward_hook(lambda m, i, o: dtypes.update(t=o.dtype))
    try: cap, got = run_one_batch(learn, teacher.model)
    finally: h.remove()
    assert dtypes['t'] == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in learn.loss_terms.history['emb_0'] + learn.loss_terms.history['kd'])
    exp, _ = expected_loss(cap, got, 3)
    assert torch.isfinite(got['loss']) and abs(got['loss'].item() - exp.item()) < 2e-2 * exp.item()


def cds_plus_kdcallback():
    "One batch of CDSCallback() with KDCallback(teacher) (a teacher without heads): CE + 0.1 sum SupCon + soft CE on view 1"
    set_seed(0)
    t = tiny_cnn(widths=T_WIDTHS)
    learn = student_learner([CDSCallback(verbose=False), KDCallback(t)])
    cap = Capture()
    capture_model(cap, 's', learn.model)
    cap.add('t_out', t)
    got = {}
    learn.add_cbs([Spy(-10, before_batch=lambda: got.update(y=learn.y.as_subclass(torch.Tensor).clone())),
                   Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach().double()), after_batch=stop)])
    try: learn.fit(1)
    finally: cap.remove()
    y = got['y']
    n = len(y)
    torch.testing.assert_close(cap.inp['t_out'], cap.inp['s_out'][:n])  # the teacher saw view 1
    ce = F.cross_entropy(cap.out['s_out'][:n], y)
    contra = sum(ref_supcon(cap.out[f's_head{k}'], y) for k in range(3))
    kd = ref_soft(cap.out['s_out'][:n], cap.out['t_out'], 3., False)
    torch.testing.assert_close(got['loss'], ce + 0.1 * contra + kd, rtol=1e-5, atol=1e-4)
    got['ce'], got['learn'] = ce, learn
    return got


def test_cds_plus_kdcallback_loss():
    cds_plus_kdcallback()


def test_cds_plus_kdcallback_records_the_plain_ce():
    got = cds_plus_kdcallback()
    hist = got['learn'].loss_terms.history
    assert len(hist['ce']) == 1
    assert abs(float(hist['ce'][0]) - got['ce'].item()) < 1e-4


def test_shorthand_and_explicit_callback_give_the_same_loss(teacher):
    "CDSCallback(teacher=t) adds a DistillCallback(t): the same loss as adding it by hand; it leaves with CDSCallback"
    losses = []
    for cbs in (lambda: CDSCallback(teacher=teacher, verbose=False), lambda: [CDSCallback(verbose=False), DistillCallback(teacher)]):
        set_seed(1)
        learn = student_learner(cbs())
        dist = [cb for cb in learn.cbs if isinstance(cb, DistillCallback)]
        assert len(dist) == 1 and dist[0].order > learn.cds.order and dist[0].student is learn.cds
        cap, got = run_one_batch(learn, teacher.model)
        exp, _ = expected_loss(cap, got, 3)
        torch.testing.assert_close(got['loss'], exp, rtol=1e-5, atol=1e-4)
        losses.append(got['loss'])
    torch.testing.assert_close(losses[0], losses[1])
    cds = learn.cds
    learn.remove_cb(cds)  # the explicit one stays: it was not brought by CDSCallback
    assert sum(isinstance(cb, DistillCallback) for cb in learn.cbs) == 1
    learn = student_learner(CDSCallback(teacher=teacher, verbose=False))
    learn.remove_cb(learn.cds)
    assert not any(isinstance(cb, DistillCallback) for cb in learn.cbs)


def test_distill_callback_without_cds_is_rejected(teacher):
    with pytest.raises(ValueError, match=r'add a CDSCallback.*CDSCallback\(teacher=teacher\)'):
        student_learner(DistillCallback(teacher))


def test_distill_callback_joining_a_trained_student_adds_its_adapters_to_the_optimizer(teacher):
    "Added after the student trained: the adapters join the rebuilt optimizer, which keeps the heads' state"
    set_seed(1)
    learn = student_learner(CDSCallback(verbose=False))
    learn.fit(1, 1e-3, cbs=Spy(100, after_batch=stop))
    heads = list(learn.model.heads.parameters())
    state = {id(p): learn.opt.state[p]['grad_avg'].clone() for p in heads if 'grad_avg' in learn.opt.state[p]}
    assert state and 'distill' not in learn.model.aux
    learn.add_cb(DistillCallback(teacher))
    seen = {}
    def first():
        if seen: return
        seen.update(ids={id(p) for pg in learn.opt.param_groups for p in pg['params']},
                    state={id(p): learn.opt.state[p]['grad_avg'].clone() for p in heads if id(p) in state})
    learn.fit(1, 1e-3, cbs=Spy(100, before_batch=first, after_batch=stop))
    aux = learn.model.aux['distill']
    assert len(aux) == 3 and all(isinstance(a, nn.Linear) for a in aux)
    assert all(id(p) in seen['ids'] for p in aux.parameters())
    for k, v in state.items(): assert torch.equal(seen['state'][k], v)
    assert all(learn.opt.state[p].get('grad_avg') is not None for p in aux.parameters())  # they stepped
    assert set(learn.loss_terms.history) >= {'emb_0', 'emb_1', 'emb_2', 'kd'}


def test_features_of_heads_or_pooled_stages(teacher):
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(4, c, s, s, generator=g) for c, s in ((16, 8), (32, 4))]
    taps = Taps(torch.randn(4, 1, 16, 16, generator=g), stages, [torch.randn(4, 64, generator=g) for _ in range(2)])
    heads = Distiller(teacher).features_of(taps)
    assert all(a is b for a, b in zip(heads, taps.heads)) and len(heads) == 2
    pooled = Distiller(teacher, features='stages').features_of(taps)
    for p, st in zip(pooled, stages): torch.testing.assert_close(p, st.mean((2, 3)))


# ---------------------------------------------------------------- 2. the frozen teacher
def test_teacher_mode_train_by_default_eval_on_request(teacher):
    "The teacher runs under no_grad, in train mode by default (as both reference scripts), in eval mode with teacher_bn_train=False"
    t = copy.deepcopy(teacher.model)  # train mode moves its BN statistics: leave the module's teacher as saved
    set_seed(1)
    cap, _ = run_one_batch(student_learner(CDSCallback(teacher=Learner(make_dls(), t), verbose=False)), t)
    assert cap.state['t_bn'] == (True, False)  # train mode, no_grad
    set_seed(1)
    cap, _ = run_one_batch(student_learner(CDSCallback(teacher=Distiller(teacher, teacher_bn_train=False), verbose=False)), teacher.model)
    assert cap.state['t_bn'] == (False, False)  # eval mode, no_grad
    assert cap.state['s_bn'] == (True, True)


def test_teacher_bn_train_mode_uses_batch_statistics_and_changes_nothing(teacher):
    """teacher_bn_train=True (reference code): BN in train mode normalises with the batch's statistics, yet no buffer
    (running statistics, counters) and no weight of the teacher changes, and it gets no gradient (issue 23)"""
    t = copy.deepcopy(teacher.model)
    modes = [m.training for m in t.modules()]
    set_seed(1)
    learn = student_learner(CDSCallback(teacher=Distiller(t, teacher_bn_train=True), verbose=False))
    before = snapshot(t)
    cap, _ = run_one_batch(learn, t)
    assert cap.state['t_bn'] == (True, False)
    after = snapshot(t)
    stats = [k for k in before if k.endswith('running_mean') or k.endswith('running_var') or k.endswith('num_batches_tracked')]
    assert stats and [k for k in before if not torch.equal(before[k], after[k])] == []
    assert all(p.grad is None for p in t.parameters())
    assert [m.training for m in t.modules()] == modes  # its own modes back
    # the logits it gave are those of batch statistics: a train-mode forward of a copy, not the eval-mode one
    ref = copy.deepcopy(t.model).train()
    with torch.no_grad(): batch_stats, running = ref(cap.inp['t_out']).double(), ref.eval()(cap.inp['t_out']).double()
    torch.testing.assert_close(cap.out['t_out'], batch_stats, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cap.out['t_out'], running, atol=1e-3)


def test_creating_a_student_leaves_a_bn_train_teacher_unchanged(teacher):
    t = copy.deepcopy(teacher.model)
    before = snapshot(t)
    student_learner(CDSCallback(teacher=Distiller(t, teacher_bn_train=True), verbose=False))
    after = snapshot(t)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


# ---------------------------------------------------------------- 3. a full student fit, export, fresh processes
CHILD_EXPORT = BLOCKED + textwrap.dedent("""
    x = torch.load(f'{d}/x.pt')
    res, out = {'blocked': blocked}, {}
    for kind in sys.argv[2:]:
        learn = load_learner(f'{d}/{kind}.pkl')
        m = learn.model.eval()
        with torch.no_grad():
            out[kind] = m(x)
        res[kind] = {'keys': list(m.state_dict()), 'model_type': type(m).__module__ + '.' + type(m).__qualname__,
                     'cbs': [type(cb).__module__ + '.' + type(cb).__qualname__ for cb in learn.cbs]}
    res['loaded_cds_modules'] = [k for k, v in sys.modules.items() if k.startswith('fastai_cds') and v is not None]
    torch.save(out, f'{d}/out.pt')
    json.dump(res, open(f'{d}/res.json', 'w'))
""")

# The teacher's Learner rebuilt in a fresh process from fastai_cds and the source of `tiny_cnn` alone (no test file
# imported): the same architecture, CDS heads, and `learn.save` file
CHILD_TEACHER = textwrap.dedent("""
    import sys, warnings
    warnings.filterwarnings('ignore')
    import torch, torch.nn as nn
    torch.set_num_threads(1)
    from fastai.layers import ConvLayer, Flatten
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai_cds.cds import CDSCallback
    from fastai_cds.digits import digits_dls
    from fastai_cds.distill import Teacher, load_teacher
""") + inspect.getsource(tiny_cnn) + textwrap.dedent(f"""
    d = sys.argv[1]
    def teacher_learner():
        return Learner(digits_dls(size=16, bs=16, device='cpu'), tiny_cnn(widths={T_WIDTHS!r}),
                       loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False), path=d)
    x = torch.load(f'{{d}}/x.pt')
    logits, taps = Teacher(load_teacher(teacher_learner, 'teacher'))(x, heads=True)
    fresh, fresh_taps = Teacher(teacher_learner())(x, heads=True)  # the same Learner, not loaded
    torch.save({{'logits': logits, 'heads': taps.heads, 'fresh_heads': fresh_taps.heads}}, f'{{d}}/teacher_out.pt')
""")


@pytest.fixture(scope="module")
def fitted(trained_teacher, tmp_path_factory):
    """Fit a CDS+KD student and a KD student one epoch each, and every method of the comparison with CDS two steps each
    (from the same teacher, in train mode); export them all; load them in a process without fastai_cds and the teacher
    (`load_teacher`) in another, both fresh, in parallel"""
    d = Path(trained_teacher.path)
    t_before, t_modes = snapshot(trained_teacher.model), [m.training for m in trained_teacher.model.modules()]
    valid_before = trained_teacher.validate()
    set_seed(2)
    cds = student_learner(CDSCallback(teacher=Distiller(trained_teacher, teacher_bn_train=False), verbose=False))  # eval mode
    aux_before = snapshot(cds.model.aux['distill'])
    with cds.no_logging(): cds.fit(1, 1e-2)
    kd = student_learner(KDCallback(trained_teacher))
    with kd.no_logging(): kd.fit(1, 1e-2)
    comparison = {}
    for name, make in COMPARISON.items():
        before = snapshot(trained_teacher.model)
        learn = student_learner(make(trained_teacher), dls=item_index_dls(make_dls()) if 'crd' in name else None)
        s_before = snapshot(learn.model.model)
        with learn.no_logging(): learn.fit(1, 1e-2, cbs=Spy(100, after_batch=stop_after(2)))
        comparison[name] = dict(learn=learn, s_before=s_before,
                                changed=[k for k, v in snapshot(trained_teacher.model).items() if not torch.equal(v, before[k])])
    x = make_dls().valid.one_batch()[0].as_subclass(torch.Tensor).clone()
    torch.save(x, d / 'x.pt')
    preds = {}
    for kind, learn in (('cds', cds), ('kd', kd), *((n, c['learn']) for n, c in comparison.items())):
        learn.export(d / f'{kind}.pkl')
        plain = learn.model.model if isinstance(learn.model, DeepSupervisionModel) else learn.model
        plain.eval()
        with torch.no_grad(): preds[kind] = plain(x)
    run_children((CHILD_EXPORT, d, 'cds', 'kd', *COMPARISON), (CHILD_TEACHER, d))
    return dict(dir=d, cds=cds, kd=kd, x=x, preds=preds, t_before=t_before, t_modes=t_modes, aux_before=aux_before,
                valid_before=valid_before, comparison=comparison,
                res=json.load(open(d / 'res.json')), out=torch.load(d / 'out.pt'), t_out=torch.load(d / 'teacher_out.pt'))


def stop_after(n):
    k = [0]
    def f():
        k[0] += 1
        if k[0] >= n: raise CancelFitException()
    return f


def test_teacher_unchanged_and_without_gradient_after_student_fits(trained_teacher, fitted):
    teacher = trained_teacher  # in eval mode for these students
    after = snapshot(teacher.model)
    assert after.keys() == fitted['t_before'].keys()
    for k, v in fitted['t_before'].items():  # weights, heads and BN running statistics (and their counters)
        assert torch.equal(v, after[k]), k
    assert any('running_mean' in k for k in after)
    assert all(p.grad is None for p in teacher.model.parameters())
    assert [m.training for m in teacher.model.modules()] == fitted['t_modes']


def test_student_fits_and_records_every_term(fitted):
    for kind, names in (('cds', ['ce', 'contra_0', 'contra_1', 'contra_2', 'emb_0', 'emb_1', 'emb_2', 'kd']), ('kd', ['ce', 'kd'])):
        rec = fitted[kind].recorder
        assert list(rec.metric_names[3:-1]) == names
        assert all(torch.isfinite(torch.tensor(v)) for v in rec.values[-1])
        assert len(fitted[kind].loss_terms.history['kd']) == 4  # 64 items / bs 16


def test_adapters_are_trained_and_in_the_optimizer(fitted):
    learn = fitted['cds']
    aux = learn.model.aux['distill']
    assert list(learn.model.aux) == ['distill'] and len(aux) == 3 and all(isinstance(a, nn.Linear) for a in aux)
    after = snapshot(aux)
    assert all(not torch.equal(v, after[k]) for k, v in fitted['aux_before'].items()), "an adapter did not train"
    opt_ids = {id(p) for pg in learn.opt.param_groups for p in pg['params']}
    assert all(id(p) in opt_ids for p in aux.parameters())
    assert any(learn.opt.state[p] for p in aux.parameters())


def test_export_in_a_process_without_fastai_cds(teacher, fitted):
    res, out = fitted['res'], fitted['out']
    assert res['blocked'] and res['loaded_cds_modules'] == []
    for kind in ('cds', 'kd'):
        assert res[kind]['keys'] == list(tiny_cnn(widths=S_WIDTHS).state_dict()), "not the student's plain state_dict"
        assert res[kind]['model_type'] == 'torch.nn.modules.container.Sequential'
        assert not any(c.startswith('fastai_cds') for c in res[kind]['cbs'])
        torch.testing.assert_close(out[kind], fitted['preds'][kind], atol=1e-5, rtol=0)
        assert fitted['preds'][kind].std(0).sum() > 0
        assert ours(fitted['dir'] / f'{kind}.pkl') == []
        with zipfile.ZipFile(fitted['dir'] / f'{kind}.pkl') as z: members = b''.join(z.read(n) for n in z.namelist())
        # no teacher, adapter or head inside: none of their weights is in the file
        tm = teacher.model
        for w in (tm.model[0][0].weight, tm.model[2][0].weight, next(tm.heads[0].parameters())):
            assert w.detach().numpy().tobytes() not in members
        if kind == 'cds':
            for w in (fitted['cds'].model.aux['distill'][0].weight, next(fitted['cds'].model.heads[0].parameters())):
                assert w.detach().numpy().tobytes() not in members
    # the in-memory student keeps its heads, adapters and teacher
    assert isinstance(fitted['cds'].model, DeepSupervisionModel) and list(fitted['cds'].model.aux) == ['distill']


def test_teacher_from_file_in_a_fresh_process(teacher, fitted):
    x, t_out = fitted['x'], fitted['t_out']
    logits, taps = Teacher(teacher)(x, heads=True)
    assert isinstance(taps, Taps) and torch.equal(taps.x, x)
    heads = taps.heads
    assert len(t_out['heads']) == len(heads) == 3
    torch.testing.assert_close(t_out['logits'], logits, atol=1e-5, rtol=1e-5)
    for a, b, f in zip(t_out['heads'], heads, t_out['fresh_heads']):
        assert a.shape == b.shape == (len(x), 64)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(f, b, atol=1e-3)  # a meaningful comparison: an untrained teacher differs


@pytest.mark.parametrize('name', list(COMPARISON))
def test_comparison_method_trains_with_cds_and_leaves_the_teacher(fitted, name):
    """Two steps with CDS: the student changed, CDS's and the method's terms recorded; no parameter or buffer of the teacher
    (weights, heads, BatchNorm statistics and counters) changed during that student's fit"""
    c = fitted['comparison'][name]
    learn = c['learn']
    assert c['changed'] == []
    assert any(not torch.equal(v, snapshot(learn.model.model)[k]) for k, v in c['s_before'].items())
    hist = learn.loss_terms.history
    assert len(hist['ce']) == len(hist['contra_0']) == len(hist[TERM[name]]) == 2
    assert all(torch.isfinite(v) for vs in hist.values() for v in vs)
    assert all(cb.teacher.bn_train for cb in learn.cbs if isinstance(cb, TeacherCallback))


def test_teachers_own_validation_unchanged_by_every_student(trained_teacher, fitted):
    "The user's report (issue 23): the teacher Learner's validation, after all the students, is what it was before them"
    assert trained_teacher.validate() == fitted['valid_before']


@pytest.mark.parametrize('name', list(COMPARISON))
def test_comparison_export_is_plain_and_loads_without_fastai_cds(trained_teacher, fitted, name):
    "A plain student that loads without fastai_cds; no adapter, regressor, embedding, memory bank, head or teacher weight inside"
    res, d, learn = fitted['res'], fitted['dir'], fitted['comparison'][name]['learn']
    assert res['blocked'] and res['loaded_cds_modules'] == []
    assert res[name]['keys'] == list(tiny_cnn(widths=S_WIDTHS).state_dict())
    assert res[name]['model_type'] == 'torch.nn.modules.container.Sequential'
    assert not any(c.startswith('fastai_cds') for c in res[name]['cbs'])
    torch.testing.assert_close(fitted['out'][name], fitted['preds'][name], atol=1e-5, rtol=0)
    assert ours(d / f'{name}.pkl') == []
    with zipfile.ZipFile(d / f'{name}.pkl') as z: members = b''.join(z.read(n) for n in z.namelist())
    aux = learn.model.aux
    kept = [w for w in [*aux.parameters(), *aux.buffers(), *learn.model.heads.parameters(), trained_teacher.model.model[0][0].weight]
            if w.numel() >= 16]  # (a scalar's bytes may occur anywhere)
    assert len(kept) > 7 and all(w.detach().numpy().tobytes() not in members for w in kept)
    assert (len(list(aux.parameters())) > 0) == (name in ('cds+distill', 'cds+fitnet', 'cds+crd+kd'))


# ---------------------------------------------------------------- 4. errors
def test_head_count_mismatch_names_both_lists(teacher):
    with pytest.raises(ValueError, match=re.escape("2 heads ['1', '2'] and the teacher 3 ['0', '1', '2']")):
        student_learner(CDSCallback(teacher=teacher, layers=['1', '2'], verbose=False))
    with pytest.raises(ValueError, match=r"teacher_heads=\[0\] must give one teacher head \(0..2\) for each of the 2"):
        student_learner(CDSCallback(teacher=Distiller(teacher, teacher_heads=[0]), layers=['1', '2'], verbose=False))
    with pytest.raises(ValueError, match=r"teacher_heads=\[0, 3\]"):
        student_learner(CDSCallback(teacher=Distiller(teacher, teacher_heads=[0, 3]), layers=['1', '2'], verbose=False))


def test_teacher_without_heads_is_rejected():
    plain = no_bar(Learner(make_dls(), tiny_cnn(widths=T_WIDTHS), loss_func=CrossEntropyLossFlat()))
    for make in (lambda: CDSCallback(teacher=plain), lambda: Distiller(plain.model), lambda: Distiller.paper(plain)):
        with pytest.raises(ValueError, match='no CDS heads.*CDSCallback'): make()
    with pytest.raises(ValueError, match='no CDS heads'): load_teacher(lambda: plain, 'teacher')
    KDCallback(plain)  # logit distillation needs no heads


def test_load_teacher_rejects_a_file_without_heads(tmp_path):
    "`learn.load` starts a CDS learner from a plain file (fresh heads); a teacher's heads must come from its file"
    plain = no_bar(Learner(make_dls(), tiny_cnn(widths=T_WIDTHS), loss_func=CrossEntropyLossFlat(), path=tmp_path))
    plain.save('plain')
    make = lambda: no_bar(Learner(make_dls(), tiny_cnn(widths=T_WIDTHS), loss_func=CrossEntropyLossFlat(), path=tmp_path,
                                  cbs=CDSCallback(verbose=False)))
    with pytest.raises(ValueError, match=r"load_teacher: 'plain' does not hold this teacher's model and trained heads") as e:
        load_teacher(make, 'plain')
    assert 'Missing key(s) in state_dict: "model.0.0.weight"' in str(e.value.__cause__) and '"heads.0.' in str(e.value.__cause__)


@pytest.mark.parametrize('make,match', [
    (lambda t: Distiller(t, features='pixels'), "features must be 'heads' or 'stages'"),
    (lambda t: Distiller(t, emb_weight=-1), 'weights must be >= 0'),
    (lambda t: Distiller(t, T=0), 'T must be > 0'),
    (lambda t: KDCallback(t, T=0), 'T must be > 0'),
    (lambda t: KDCallback(t, weight=-0.5), 'weight must be >= 0'),
])
def test_bad_arguments(teacher, make, match):
    with pytest.raises(ValueError, match=match): make(teacher)


# ---------------------------------------------------------------- 5. KDCallback
@pytest.mark.parametrize('kw,ref', [(dict(), dict(T=3., kl=False, weight=1.)),
                                    (dict(T=2., weight=0.5, kl=True), dict(T=2., kl=True, weight=0.5))])
def test_kd_loss_equals_hand_computation(teacher, kw, ref):
    set_seed(1)
    learn = student_learner(KDCallback(teacher, **kw))
    cap = Capture()
    cap.add('s_out', learn.model)
    cap.add('t_out', teacher.model.model)
    cap.add('t_bn', next(m for m in teacher.model.modules() if is_bn(m)))
    got = {}
    learn.add_cbs([Spy(-10, before_batch=lambda: got.update(y=learn.y.as_subclass(torch.Tensor).clone())),
                   Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach().double()), after_batch=stop)])
    try: learn.fit(1)
    finally: cap.remove()
    y, s, t = got['y'], cap.out['s_out'], cap.out['t_out']
    assert s.shape == t.shape == (16, 10)
    torch.testing.assert_close(cap.inp['t_out'], cap.inp['s_out'])
    assert cap.state['t_bn'] == (False, False)
    ce, kd = F.cross_entropy(s, y), ref_soft(s, t, ref['T'], ref['kl'])
    torch.testing.assert_close(got['loss'], ce + ref['weight'] * kd, rtol=1e-5, atol=1e-5)
    hist = learn.loss_terms.history
    assert abs(float(hist['kd'][0]) - kd.item()) < 1e-5 and abs(float(hist['ce'][0]) - ce.item()) < 1e-5
    assert 'kd' in learn.recorder.metric_names


def test_kd_teacher_can_be_any_module_and_validation_is_plain(teacher):
    "A plain nn.Module teacher; no teacher call and the plain loss during validation"
    t = copy.deepcopy(teacher.model.model)
    calls = [0]
    h = t.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    learn = student_learner(KDCallback(t))
    learn.add_cb(Spy(100, before_validate=lambda: calls.__setitem__(0, -calls[0])))
    with learn.no_logging(): learn.fit(1, 1e-3)
    h.remove()
    assert calls[0] == -4  # one teacher call per training batch, none while validating
    vloss = learn.validate()[0]
    learn.model.eval()
    with torch.no_grad():
        ref = sum(F.cross_entropy(learn.model(xb), yb.as_subclass(torch.Tensor), reduction='sum').item() for xb, yb in learn.dls.valid)
    assert abs(vloss - ref / 16) < 1e-5


# ---------------------------------------------------------------- the reference settings
@pytest.mark.parametrize('setting,expected', [
    ('cifar', (0.1, 0.1, 1., 3., False, False)),  # CIFAR/distill.py: torch.dist * 0.1, CrossEntropy(outputs/3, t/3), SupCon * 0.1
    ('imagenet', (0.5, 0.5, 1., 1., False, False)),  # ImageNet/KD_.../main.py: torch.dist * 0.5, CrossEntropy (T 1) * 1, SupCon * 0.5
    ('paper', (0.1, 0.1, 1., 3., True, True)),  # eqs. 8-9: squared distance, KL
])
def test_reference_distillation_settings(teacher, setting, expected):
    "Each setting's contrastive weight, distance and soft-target weights, temperature and forms; the teacher in train mode, as both reference scripts"
    weight, d = reference_distillation(teacher, setting)
    assert (weight, d.emb_weight, d.logit_weight, d.T, d.squared, d.kl) == expected
    assert d.teacher.bn_train is True
    assert reference_distillation(teacher, setting, teacher_bn_train=False)[1].teacher.bn_train is False
    with pytest.raises(ValueError, match="setting must be one of"): reference_distillation(teacher, 'cifar100')


def test_teacher_in_train_mode_uses_batch_statistics(teacher):
    "Train mode (the default, as the reference): BatchNorm normalises with the batch's statistics and its running ones stay; so in eval mode"
    t = Distiller(teacher).teacher
    t.model.eval()
    bn = next(m for m in t.model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(8, 1, 16, 16) * 3 + 1
    before = snapshot(t.model)
    logits_train = t(x)
    t_eval = Distiller(teacher, teacher_bn_train=False).teacher
    logits_eval = t_eval(x)
    assert [k for k, v in snapshot(t.model).items() if not torch.equal(v, before[k])] == []
    assert not torch.allclose(logits_train, logits_eval)
    assert not any(m.training for m in t.model.modules())  # the mode is set for the forward only
    assert bn.track_running_stats  # restored after the call


# ---------------------------------------------------------------- 6. the teacher left as given; KD as RepDistiller's; the 'ce' once
class Counting(nn.Module):
    "A module writing a buffer in its forward (a counter), besides a BatchNorm"
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.register_buffer('calls', torch.zeros(()))
    def forward(self, x):
        self.calls += 1
        return self.bn(x).flatten(1)


def test_buffers_kept_whatever_the_forward_writes():
    "No buffer changes in train mode: BatchNorm tracks nothing in the block, other buffers are put back, also after an error"
    from fastai_cds.distill import buffers_kept
    m = Counting().train()
    m.bn.running_mean.fill_(3.)
    before = snapshot(m)
    x = torch.randn(4, 1, 2, 2) + 5
    with buffers_kept(m): out = m(x)
    assert [k for k, v in snapshot(m).items() if not torch.equal(v, before[k])] == []
    torch.testing.assert_close(out, F.batch_norm(x, None, None, m.bn.weight, m.bn.bias, True).flatten(1))  # batch statistics
    with pytest.raises(RuntimeError, match='boom'):
        with buffers_kept(m):
            m(x)
            raise RuntimeError('boom')
    assert [k for k, v in snapshot(m).items() if not torch.equal(v, before[k])] == [] and m.bn.track_running_stats
    m(x)  # outside the block the module is as before: it tracks its statistics
    assert not torch.equal(m.bn.running_mean, before['bn.running_mean']) and m.calls == 1


def test_kd_repdistiller_loss_equals_hand_computation(teacher):
    "RepDistiller's KD: 0.1 x CE + 0.9 x KL(p_t || p_s) x 16 at T = 4, the teacher in eval mode; 'ce' and 'kd' recorded"
    set_seed(1)
    learn = student_learner(KDCallback.repdistiller(teacher))
    cap = Capture()
    cap.add('s_out', learn.model)
    cap.add('t_out', teacher.model.model)
    cap.add('t_bn', next(m for m in teacher.model.modules() if is_bn(m)))
    got = {}
    learn.add_cbs([Spy(-10, before_batch=lambda: got.update(y=learn.y.as_subclass(torch.Tensor).clone())),
                   Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach().double()), after_batch=stop)])
    try: learn.fit(1)
    finally: cap.remove()
    s, t, y = cap.out['s_out'], cap.out['t_out'], got['y']
    assert cap.state['t_bn'] == (False, False)
    ce, kl = F.cross_entropy(s, y), (F.softmax(t / 4, 1) * (F.log_softmax(t / 4, 1) - F.log_softmax(s / 4, 1))).sum(1).mean()
    torch.testing.assert_close(got['loss'], 0.1 * ce + 0.9 * 16 * kl, rtol=1e-5, atol=1e-5)
    hist = learn.loss_terms.history
    assert abs(float(hist['ce'][0]) - ce.item()) < 1e-5 and abs(float(hist['kd'][0]) - 16 * kl.item()) < 1e-4


def test_kd_ce_weight_needs_to_come_first(teacher):
    "ce_weight scales the learner's own loss: with CDS (whose terms come first) it is refused when fit starts, before a step"
    learn = student_learner([CDSCallback(verbose=False), KDCallback.repdistiller(teacher)])
    before = snapshot(learn.model)
    with pytest.raises(ValueError, match=r'KDCallback\(ce_weight=0.1\) scales the learner.s own loss.*leave ce_weight=1'):
        learn.fit(1, 1e-3)
    assert all(torch.equal(v, snapshot(learn.model)[k]) for k, v in before.items())
    with pytest.raises(ValueError, match='ce_weight must be >= 0'): KDCallback(teacher, ce_weight=-1)


def test_the_learners_loss_is_recorded_once(teacher):
    "By the first distillation callback (KD before AT), or by CDS when it is there; each method's term under its name"
    from fastai_cds.stage_distill import ATCallback
    for cbs, names in (([ATCallback(teacher, verbose=False), KDCallback(teacher)], ['ce', 'kd', 'at']),
                       ([CDSCallback(verbose=False), ATCallback(teacher, verbose=False), KDCallback(teacher)],
                        ['ce', 'contra_0', 'contra_1', 'contra_2', 'kd', 'at'])):
        learn = student_learner(cbs)
        with learn.no_logging(): learn.fit(1, 1e-3, cbs=Spy(100, after_batch=stop))
        assert list(learn.loss_terms.history) == names
        assert list(learn.recorder.metric_names[3:-1]) == names
