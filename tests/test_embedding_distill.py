"""Tests of `fastai_cds.embedding_distill` (RKD, CRD): each loss against a float64 implementation written here from the
reference's definition (RepDistiller's distiller_zoo/RKD.py, crd/), gradients included; CRD's memory bank (momentum
update with the batch's indices, its size, the negatives); item indices the fastai way (a DataLoader that yields them,
taken off before other callbacks see the batch); the callbacks in real fastai batches; CRD without indices."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import TensorCategory, TensorImage, to_device

from fastai_cds.cds import CDSCallback
from fastai_cds.digits import digits_items
from fastai_cds.distill import KDCallback
from fastai_cds.embedding_distill import (CRDCallback, CRDLoss, ItemIndexCallback, RKDCallback, item_index_dls, item_labels,
                                          nce_loss, rkd_loss, sample_negatives, with_item_index)
from fastai_cds.tensor_data import tensor_dls

from helpers import MEAN, STD, Spy, hooked_modules, no_bar, small_dls, snapshot, stop, tiny_cnn

pytestmark = pytest.mark.usefixtures("seeded")
T_WIDTHS = (16, 32, 64)


@pytest.fixture(scope="module")
def sdls():
    "32 digits to train, batches of 16"
    return small_dls(n_train=32, bs=16)


def student(dls, cbs):
    return no_bar(Learner(dls, tiny_cnn(widths=(8, 16, 32)), loss_func=CrossEntropyLossFlat(), cbs=cbs))


# ---------------------------------------------------------------- float64 references (RepDistiller's definitions)
def huber(a, b):
    "smooth L1 with beta 1, mean over the entries"
    x = (a - b).abs()
    return torch.where(x < 1, 0.5 * x ** 2, x - 0.5).mean()


def ref_rkd(s, t, wd=25., wa=50.):
    """distiller_zoo/RKD.py from its definition: pairwise distances over their positive mean; for every triplet the cosine
    <x_j - x_i, x_k - x_i> / (|x_j - x_i| |x_k - x_i|) (0 where j or k is i); smooth L1 of each against the teacher's"""
    s, t = s.double(), t.double().detach()
    def dist(e):
        off = ~torch.eye(len(e), dtype=torch.bool)
        d = torch.zeros(len(e), len(e), dtype=torch.float64)
        d[off] = (e[:, None] - e[None])[off].pow(2).sum(-1).sqrt()
        return d / d[off].mean()
    def angle(e):
        diff = e[None] - e[:, None]  # [i, j] = x_j - x_i
        norm = diff.pow(2).sum(-1).clamp(min=1e-300).sqrt()
        ok = ~torch.eye(len(e), dtype=torch.bool)
        ok = ok[:, :, None] & ok[:, None, :]
        a = torch.zeros(len(e), len(e), len(e), dtype=torch.float64)
        a[ok] = (torch.einsum('ijd,ikd->ijk', diff, diff) / (norm[:, :, None] * norm[:, None, :]))[ok]
        return a
    return wd * huber(dist(s), dist(t)) + wa * huber(angle(s), angle(t))


def ref_crd(f_s, f_t, crd, mem_s, mem_t, contrast, z=None, eps=1e-7):
    """crd/criterion.py + crd/memory.py: unit embeddings; student anchors against the teacher memory and vice versa,
    scores exp(m.v/T)/Z with Z = mean x N from the first batch; NCE against uniform noise K/N; summed. (loss, (Z_s, Z_t))"""
    def embed(f, lin): v = f.double() @ lin.weight.double().T + lin.bias.double(); return v / v.norm(dim=1, keepdim=True)
    v_s, v_t = embed(f_s, crd.embed_s), embed(f_t, crd.embed_t)
    n, k = len(mem_s), contrast.shape[1] - 1
    def side(v, mem, zz):
        e = torch.exp((mem.double()[contrast] * v[:, None, :]).sum(-1) / crd.T)
        zz = e.detach().mean() * n if zz is None else zz
        p, c = e / zz, k / n
        return -(torch.log(p[:, 0] / (p[:, 0] + c + eps)).sum() + torch.log(c / (p[:, 1:] + c + eps)).sum()) / len(p), zz
    (ls, zs), (lt, zt) = side(v_s, mem_t, None if z is None else z[0]), side(v_t, mem_s, None if z is None else z[1])
    return ls + lt, (zs, zt), v_s.detach(), v_t.detach()


# ---------------------------------------------------------------- 1. the losses on fixed tensors, values and gradients
def test_rkd_loss_equals_reference_with_gradients():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 7, generator=g) * 3
    s1, s2 = s.clone().requires_grad_(), s.double().requires_grad_()
    got, exp = rkd_loss(s1, t), ref_rkd(s2, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-7)
    got.backward(); exp.backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)
    assert rkd_loss(s, t, angle_weight=0.).item() != pytest.approx(got.item())  # both terms count
    with torch.autocast('cpu', dtype=torch.bfloat16): assert rkd_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_crd_loss_equals_reference_with_gradients_and_keeps_z():
    "Loss and gradients (student feature, both embeddings); Z set on the first batch and kept for the next"
    g = torch.Generator().manual_seed(1)
    crd = CRDLoss(6, 9, n_items=20, dim=4, T=0.07)
    for _ in range(2):
        f_s, f_t = torch.randn(3, 6, generator=g), torch.randn(3, 9, generator=g)
        idx = torch.randperm(20, generator=g)[:3]
        contrast = torch.cat([idx[:, None], sample_negatives(idx, 5, 20)], 1)
        mem_s, mem_t, z = crd.memory.student.clone(), crd.memory.teacher.clone(), crd.memory.z.clone()
        ref = copy.deepcopy(crd).double()
        f1, f2 = f_s.clone().requires_grad_(), f_s.double().requires_grad_()
        got = crd(f1, f_t, idx, contrast)
        exp, zz, v_s, v_t = ref_crd(f2, f_t, ref, mem_s, mem_t, contrast, None if z[0] < 0 else z.double())
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(crd.memory.z.double(), torch.stack(zz), rtol=1e-4, atol=0)
        crd.zero_grad(); got.backward(); exp.backward()
        torch.testing.assert_close(f1.grad.double(), f2.grad, rtol=1e-3, atol=1e-6)
        for a, b in ((crd.embed_s.weight, ref.embed_s.weight), (crd.embed_t.weight, ref.embed_t.weight)):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-6)
        # the momentum update of the batch's rows (crd/memory.py: normalize(0.5 old + 0.5 new)); the other rows as they were
        for mem, old, v in ((crd.memory.student, mem_s, v_s), (crd.memory.teacher, mem_t, v_t)):
            new = 0.5 * old[idx].double() + 0.5 * v
            torch.testing.assert_close(mem[idx].double(), new / new.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
            rest = torch.ones(20, dtype=torch.bool); rest[idx] = False
            assert torch.equal(mem[rest], old[rest])


def test_nce_loss_formula():
    "h = p / (p + K/N): -(log h_pos + sum log(1 - h_neg)), per anchor, mean"
    p = torch.tensor([[2., .5, .1], [.3, .3, .01]])
    c = 2 / 10
    h = p.double() / (p.double() + c + 1e-7)
    exp = -(h[:, 0].log() + (c / (p.double()[:, 1:] + c + 1e-7)).log().sum(1)).mean()
    torch.testing.assert_close(nce_loss(p, 10).double(), exp)


def test_sample_negatives_never_the_anchor():
    "Any other item, or the other classes' items; without replacement when there are enough candidates; every candidate drawn"
    labels = torch.arange(40) % 4
    idx = torch.tensor([0, 5, 10, 39, 22])
    for _ in range(20):
        neg = sample_negatives(idx, 16, 40)
        assert neg.shape == (5, 16) and not (neg == idx[:, None]).any() and ((neg >= 0) & (neg < 40)).all()
        assert all(len(set(r)) == 16 for r in neg.tolist())  # 39 candidates: distinct
        neg = sample_negatives(idx, 16, 40, labels)
        assert not (labels[neg] == labels[idx][:, None]).any() and all(len(set(r)) == 16 for r in neg.tolist())
    many = sample_negatives(idx, 3000, 40, labels)  # more than the 30 candidates: with replacement, all of them reached
    for r, a in zip(many.tolist(), idx.tolist()):
        assert set(r) == {j for j in range(40) if j % 4 != a % 4}
    rep = sample_negatives(idx, 16, 40, replace=True)
    assert not (rep == idx[:, None]).any()
    with pytest.raises(ValueError, match='no candidate negative'): sample_negatives(idx[:1], 2, 3, torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- 2. item indices, the fastai way
def tensor_digits(n_train=48, n_valid=16, bs=16):
    "tensor_dls of the digits at 8 px (TensorImageDL: a batch is one indexing of the images)"
    items, labels = digits_items()
    ims = torch.stack([torch.from_numpy(im) for im, _ in items])[:, None][:n_train + n_valid]
    ys = torch.as_tensor(labels)[:n_train + n_valid]
    return tensor_dls((ims[:n_train], ys[:n_train]), (ims[n_train:], ys[n_train:]), [str(i) for i in range(10)], bs=bs,
                      batch_tfms=[Normalize.from_stats([MEAN], [STD], cuda=False)], device='cpu')


@pytest.mark.parametrize('kind', ['TfmdDL', 'TensorImageDL'])
def test_item_index_dls_yield_each_items_index(sdls, kind):
    dls = sdls if kind == 'TfmdDL' else tensor_digits()
    idls = item_index_dls(dls)
    assert idls.valid is dls.valid and idls.train is not dls.train and with_item_index(idls.train) is idls.train
    assert idls.n_inp == 1 and type(idls.train).__name__ == ('ItemIndexDL' if kind == 'TfmdDL' else 'ItemIndexTensorImageDL')
    tl = dls.train
    seen = []
    for x, y, i in idls.train:  # each row is the item its index names: made again by the plain loader from that index
        if kind == 'TfmdDL': ref = tl.after_batch(to_device(tl.do_batch([tl.do_item(int(j)) for j in i]), tl.device))
        else: ref = tl.after_batch((TensorImage(tl.dataset.images[i]), TensorCategory(tl.dataset.labels[i])))
        torch.testing.assert_close(x.as_subclass(torch.Tensor), ref[0].as_subclass(torch.Tensor))
        assert torch.equal(y.as_subclass(torch.Tensor), ref[1].as_subclass(torch.Tensor))
        seen += i.tolist()
    assert sorted(seen) == list(range(len(tl.dataset)))  # one epoch: every item once (drop_last: 32 and 48 fill whole batches)
    assert type(idls.train.plain_dl()).__name__ == 'TfmdDL'


def test_other_callbacks_see_plain_batches(sdls):
    "ItemIndexCallback takes the index off first: CDS, the loss and a callback at order -19 see (x, y); get_preds on the indexed loader works"
    idls = item_index_dls(sdls)
    t = tiny_cnn(widths=T_WIDTHS)
    learn = student(idls, [CDSCallback(verbose=False), CRDCallback(t, k=8, verbose=False)])
    seen = []
    index = next(cb for cb in learn.cbs if isinstance(cb, ItemIndexCallback))
    learn.add_cb(Spy(-19, before_batch=lambda: seen.append((learn.training, len(learn.yb), index.idxs is not None))))
    with learn.no_logging(): learn.fit(1, 1e-3)
    assert set(seen) == {(True, 1, True), (False, 1, False)} and hooked_modules(learn.model) == []  # the validation loader: no index
    preds, targs = learn.get_preds(dl=idls.train.new(shuffle=False, drop_last=False))  # validation mode on the indexed loader
    assert preds.shape == (32, 10) and targs.shape == (32,)


def test_item_labels(sdls):
    labels = item_labels(sdls.train)
    assert labels.tolist() == [int(sdls.train.dataset[i][1]) for i in range(32)]
    dls = tensor_digits()
    assert torch.equal(item_labels(dls.train), dls.train.dataset.labels)
    with pytest.raises(ValueError, match="pass negatives='instance'"): item_labels(small_dls(labels=False).train)


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


def ref_ce(logits, y):
    logits = logits.double()
    return (logits.logsumexp(1) - logits[torch.arange(len(y)), y]).mean()


def test_rkd_callback_loss_equals_hand_computation(sdls):
    "CE + 1 x RKD(pooled final maps), the teacher in eval mode (RepDistiller)"
    t = tiny_cnn(widths=T_WIDTHS)
    learn = student(sdls, RKDCallback(t, verbose=False))
    cap = Capture()
    cap.add('s2', learn.model[2]); cap.add('t2', t[2]); cap.add('t_out', t)
    got = {}
    learn.add_cbs([Spy(-30, before_batch=lambda: got.update(y=learn.y.as_subclass(torch.Tensor).clone())),
                   Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach().double(), pred=learn.pred.detach()),
                       after_batch=stop)])
    try: learn.fit(1, 1e-3)
    finally: cap.remove()
    with torch.no_grad(): assert torch.allclose(cap.out['t_out'], copy.deepcopy(t).eval()(cap.inp['t_out']).double())
    exp = ref_ce(got['pred'], got['y']) + ref_rkd(cap.out['s2'].mean((2, 3)), cap.out['t2'].mean((2, 3)))
    torch.testing.assert_close(got['loss'], exp, rtol=1e-4, atol=1e-5)


def test_crd_callback_batch_memory_and_negatives(sdls):
    """CRD + KD alone: the loss is CE + KD + 0.8 x the reference NCE of the pooled final maps; the memory holds the training
    set, the batch's indices are the anchors' positives and never their negatives (nor an item of their class); the memory
    rows of the batch move with momentum 0.5 and no other row does"""
    idls = item_index_dls(sdls)
    t = tiny_cnn(widths=T_WIDTHS)
    learn = student(idls, [CRDCallback(t, k=8, verbose=False), KDCallback.repdistiller(t, weight=1., ce_weight=1.)])
    crd = learn.model.aux['crd']
    assert len(crd.memory.student) == len(crd.memory.teacher) == len(sdls.train.dataset) == 32
    assert (crd.embed_s.in_features, crd.embed_t.in_features, crd.embed_s.out_features) == (32, 64, 128)
    cap, got = Capture(), {}
    cap.add('s2', learn.model.model[2]); cap.add('t2', t[2]); cap.add('s_out', learn.model.model); cap.add('t_out', t)
    def pre(m, args):
        f_s, f_t, idx, contrast = args
        got.update(f_s=f_s.detach().clone(), f_t=f_t.detach().clone(), idx=idx.clone(), contrast=contrast.clone(),
                   mem_s=m.memory.student.clone(), mem_t=m.memory.teacher.clone(), ref=copy.deepcopy(m))
    h = crd.register_forward_pre_hook(pre)
    index = next(cb for cb in learn.cbs if isinstance(cb, ItemIndexCallback))
    learn.add_cbs([Spy(-19, before_batch=lambda: got.update(y=learn.y.as_subclass(torch.Tensor).clone(), batch_idx=index.idxs.clone())),
                   Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach().double(), pred=learn.pred.detach()),
                       after_batch=stop)])
    try: learn.fit(1, 1e-3)
    finally: cap.remove(); h.remove()
    idx, contrast, labels = got['idx'], got['contrast'], item_labels(sdls.train)
    assert torch.equal(idx, got['batch_idx']) and torch.equal(contrast[:, 0], idx)
    assert not (contrast[:, 1:] == idx[:, None]).any() and not (labels[contrast[:, 1:]] == labels[idx][:, None]).any()
    assert torch.equal(labels[idx], got['y'])  # the indices name the batch's items
    torch.testing.assert_close(got['f_s'].double(), cap.out['s2'].mean((2, 3)))  # the pooled final maps
    torch.testing.assert_close(got['f_t'].double(), cap.out['t2'].mean((2, 3)))
    exp_crd, _, v_s, v_t = ref_crd(got['f_s'], got['f_t'], got['ref'].double(), got['mem_s'], got['mem_t'], contrast)
    kd = (F.softmax(cap.out['t_out'] / 4, 1) * (F.log_softmax(cap.out['t_out'] / 4, 1) - F.log_softmax(got['pred'].double() / 4, 1))).sum(1).mean() * 16
    exp = ref_ce(got['pred'], got['y']) + kd + 0.8 * exp_crd
    torch.testing.assert_close(got['loss'], exp, rtol=1e-4, atol=1e-4)
    assert sorted(learn.loss_terms.history) == ['ce', 'crd', 'kd']
    for mem, old, v in ((crd.memory.student, got['mem_s'], v_s), (crd.memory.teacher, got['mem_t'], v_t)):
        new = 0.5 * old[idx].double() + 0.5 * v
        torch.testing.assert_close(mem[idx].double(), new / new.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
        rest = torch.ones(32, dtype=torch.bool); rest[idx] = False
        assert torch.equal(mem[rest], old[rest])


# ---------------------------------------------------------------- 4. bad input
def test_crd_without_item_indices_raises_before_the_first_step_and_leaves_nothing(sdls):
    model = tiny_cnn(widths=(8, 16, 32))
    keys, match = list(model.state_dict()), r"CRDCallback keeps a memory of every training item.*item_index_dls\(dls\)"
    with pytest.raises(ValueError, match=match): Learner(sdls, model, loss_func=CrossEntropyLossFlat(), cbs=CRDCallback(tiny_cnn()))
    assert hooked_modules(model) == [] and list(model.state_dict()) == keys
    learn = no_bar(Learner(sdls, model, loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)))
    ds, before = learn.model, snapshot(learn.model)
    with pytest.raises(ValueError, match=match): learn.fit(1, 1e-3, cbs=CRDCallback(tiny_cnn()))
    assert learn.model is ds and list(ds.aux) == [] and learn.dls is sdls and hooked_modules(ds) == []
    assert all(torch.equal(v, snapshot(ds)[k]) for k, v in before.items()) and '_do_epoch_train' not in vars(learn)
    assert not any(isinstance(cb, (CRDCallback, ItemIndexCallback)) for cb in learn.cbs)


@pytest.mark.parametrize('kw,match', [(dict(negatives='other'), "negatives must be 'class' or 'instance'"),
                                      (dict(k=0), 'k=0 is out of range'), (dict(T=0.), 'T=0.0 is out of range'),
                                      (dict(momentum=1.), 'momentum=1.0 is out of range'), (dict(weight=-1.), 'weight must be >= 0')])
def test_crd_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match): CRDCallback(tiny_cnn(), **kw)


def test_crd_class_negatives_need_labels():
    "An unlabelled training set: class negatives raise at the Learner's creation, instance negatives do not"
    dls = item_index_dls(small_dls(labels=False))
    make = lambda neg: Learner(dls, tiny_cnn(), loss_func=lambda p, *y: p.sum(), cbs=CRDCallback(tiny_cnn(), k=4, negatives=neg, verbose=False))
    with pytest.raises(ValueError, match="pass negatives='instance'"): make('class')
    assert len(make('instance').model.aux['crd'].memory.student) == 32
