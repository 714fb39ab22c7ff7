"""The paper's distillation comparison (Tables 7 and 8) as a whole, on one shared tiny setup: every distillation method
combined with CDS trains a few steps from one teacher; the teacher is left as given by every distillation callback
(DistillCallback, KDCallback, FitNet, AT, SP, RKD, CRD; its parameters, its buffers, its own validation), even in train
mode; each student exports as a plain model that loads in a process where fastai_cds cannot be imported, with no
adapter, regressor, embedding or memory bank inside."""
import json
import textwrap
import zipfile

import pytest
import torch
import torch.nn as nn
from fastai.callback.core import CancelFitException
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat

from fastai_cds.cds import CDSCallback
from fastai_cds.distill import KDCallback, TeacherCallback
from fastai_cds.embedding_distill import CRDCallback, RKDCallback, item_index_dls
from fastai_cds.model import DeepSupervisionModel
from fastai_cds.stage_distill import ATCallback, FitNetCallback, SPCallback

from helpers import BLOCKED, Spy, no_bar, ours, run_children, small_dls, snapshot, tiny_cnn

T_WIDTHS, S_WIDTHS = (16, 32, 64), (8, 16, 32)
# each method as the paper's tables combine it with CDS; every teacher in train mode (BatchNorm on batch statistics),
# the setting that moved a teacher's running statistics before (issue 23)
METHODS = {
    'cds+distill': lambda t: [CDSCallback(teacher=t, verbose=False)],  # DistillCallback; train mode is its default
    'cds+kd': lambda t: [CDSCallback(verbose=False), KDCallback(t, teacher_bn_train=True)],
    'cds+fitnet': lambda t: [CDSCallback(verbose=False), FitNetCallback(t, teacher_bn_train=True, verbose=False)],
    'cds+at': lambda t: [CDSCallback(verbose=False), ATCallback(t, teacher_bn_train=True, verbose=False)],
    'cds+sp': lambda t: [CDSCallback(verbose=False), SPCallback(t, teacher_bn_train=True, verbose=False)],
    'cds+rkd': lambda t: [CDSCallback(verbose=False), RKDCallback(t, teacher_bn_train=True, verbose=False)],
    'cds+crd+kd': lambda t: [CDSCallback(verbose=False), CRDCallback(t, k=8, teacher_bn_train=True, verbose=False),
                             KDCallback.repdistiller(t, weight=1., ce_weight=1., teacher_bn_train=True)],
}
TERMS = {'cds+distill': 'emb_0', 'cds+kd': 'kd', 'cds+fitnet': 'fitnet', 'cds+at': 'at', 'cds+sp': 'sp', 'cds+rkd': 'rkd', 'cds+crd+kd': 'crd'}

CHILD = BLOCKED + textwrap.dedent("""
    x = torch.load(f'{d}/x.pt')
    res, out = {'blocked': blocked}, {}
    for kind in sys.argv[2:]:
        learn = load_learner(f'{d}/{kind}.pkl')
        m = learn.model.eval()
        with torch.no_grad(): out[kind] = m(x)
        res[kind] = {'keys': list(m.state_dict()), 'model': type(m).__module__ + '.' + type(m).__qualname__,
                     'cbs': [type(cb).__module__ for cb in learn.cbs], 'dl': type(learn.dls.train).__module__}
    res['loaded'] = [k for k, v in sys.modules.items() if k.startswith('fastai_cds') and v is not None]
    torch.save(out, f'{d}/out.pt')
    json.dump(res, open(f'{d}/res.json', 'w'))
""")


def stop_after(n):
    k = [0]
    def f():
        k[0] += 1
        if k[0] >= n: raise CancelFitException()
    return f


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """One CDS teacher (heads for DistillCallback; the others read its plain model) with non-trivial BN statistics; each
    method with CDS fits 2 steps from it; each student exported; one fresh process without fastai_cds loads them all"""
    d = tmp_path_factory.mktemp('comparison')
    torch.manual_seed(0)
    dls = small_dls(n_train=32, bs=16)
    teacher = no_bar(Learner(dls, tiny_cnn(widths=T_WIDTHS), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)))
    g = torch.Generator().manual_seed(0)
    for bn in teacher.model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    state, valid = snapshot(teacher.model), teacher.validate()
    x = dls.valid.one_batch()[0].as_subclass(torch.Tensor).clone()
    torch.save(x, d / 'x.pt')
    res = {}
    for name, make in METHODS.items():
        learn = no_bar(Learner(item_index_dls(dls) if 'crd' in name else dls, tiny_cnn(widths=S_WIDTHS),
                               loss_func=CrossEntropyLossFlat(), cbs=make(teacher)))
        before = snapshot(learn.model.model)
        with learn.no_logging(): learn.fit(1, 1e-2, cbs=Spy(100, after_batch=stop_after(2)))
        learn.export(d / f'{name}.pkl')
        plain = learn.model.model.eval()
        with torch.no_grad(): pred = plain(x)
        res[name] = dict(learn=learn, before=before, pred=pred, changed=[k for k, v in snapshot(teacher.model).items() if not torch.equal(v, state[k])])
    run_children((CHILD, d, *METHODS))
    return dict(dir=d, teacher=teacher, state=state, valid=valid, res=res, child=json.load(open(d / 'res.json')),
                out=torch.load(d / 'out.pt'))


@pytest.mark.parametrize('name', list(METHODS))
def test_each_method_trains_with_cds(comparison, name):
    "Two steps with CDS: the student changed, CDS's and the method's terms recorded, the teacher callbacks in train mode"
    r = comparison['res'][name]
    learn = r['learn']
    assert isinstance(learn.model, DeepSupervisionModel)
    after = snapshot(learn.model.model)
    assert any(not torch.equal(v, after[k]) for k, v in r['before'].items())
    hist = learn.loss_terms.history
    assert len(hist['ce']) == 2 and len(hist['contra_0']) == 2 and len(hist[TERMS[name]]) == 2
    assert all(torch.isfinite(v) for vs in hist.values() for v in vs)
    assert all(cb.teacher.bn_train for cb in learn.cbs if isinstance(cb, TeacherCallback))


@pytest.mark.parametrize('name', list(METHODS))
def test_teacher_left_as_given(comparison, name):
    "No parameter or buffer (weights, heads, BN running statistics and counters) of the teacher changed in any student's fit"
    assert comparison['res'][name]['changed'] == []


def test_teacher_validation_unchanged_and_no_gradient(comparison):
    teacher = comparison['teacher']
    assert [k for k, v in snapshot(teacher.model).items() if not torch.equal(v, comparison['state'][k])] == []
    assert teacher.validate() == comparison['valid']  # the teacher's own validation, as before the students
    assert all(p.grad is None for p in teacher.model.parameters())


@pytest.mark.parametrize('name', list(METHODS))
def test_export_is_plain_and_loads_without_fastai_cds(comparison, name):
    d, child, r = comparison['dir'], comparison['child'], comparison['res'][name]
    assert child['blocked'] and child['loaded'] == []
    c = child[name]
    assert c['keys'] == list(tiny_cnn(widths=S_WIDTHS).state_dict()) and c['model'] == 'torch.nn.modules.container.Sequential'
    assert not any(m.startswith('fastai_cds') for m in c['cbs'] + [c['dl']])
    torch.testing.assert_close(comparison['out'][name], r['pred'], atol=1e-5, rtol=0)
    assert ours(d / f'{name}.pkl') == []
    with zipfile.ZipFile(d / f'{name}.pkl') as z: members = b''.join(z.read(n) for n in z.namelist())
    aux = r['learn'].model.aux
    kept = list(aux.parameters()) + list(aux.buffers()) + list(r['learn'].model.heads.parameters()) + [comparison['teacher'].model.model[0][0].weight]
    kept = [w for w in kept if w.numel() >= 16]  # (a scalar's bytes may occur anywhere)
    assert len(kept) > 7 and all(w.detach().numpy().tobytes() not in members for w in kept)
    assert name not in ('cds+fitnet', 'cds+crd+kd', 'cds+distill') or len(list(aux.parameters())) > 0
