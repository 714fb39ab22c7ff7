"""Tests of `fastai_cds.semi`: `SemiSupervisedCallback` and its shorthand `CDSCallback(unlabelled=...)` (semi-supervised
CDS, paper eq. 6) inside real fastai training loops: the mixed loss against a hand computation, the ids of the unlabelled
images, no use of unlabelled labels, the unlabelled loader's cycle, BatchNorm over both, untouched validation, a clean
export, errors at fit start; `split_labelled` on any DataLoaders."""
import json
import zipfile
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import Datasets
from fastai.data.transforms import Categorize, IndexSplitter, IntToFloatTensor, Normalize, ToTensor
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from fastai.vision.augment import Resize
from fastai.vision.core import PILImageBW
from fastai.vision.data import ImageBlock

from fastai_cds.cds import CDSCallback
from fastai_cds.digits import digits_items
from fastai_cds.semi import SemiSupervisedCallback, UnlabelledViews, split_labelled
from fastai_cds.views import simclr_tfms

from helpers import (BLOCKED, MEAN, STD, Spy, digits_block, is_bn, no_bar, ref_supcon, run_children, ours,
                     small_dls, stop, tiny_cnn)


# ---------------------------------------------------------------- helpers
def lab_dls(n_train=64, n_valid=16, bs=16, size=16):
    "Labelled digits DataLoaders (`small_dls`): the first `n_train` digits to train, the next `n_valid` to validate"
    return small_dls(n_train, n_valid, size, bs=bs)


def unlab_dl(n=24, bs=8, start=500, size=16, n_channels=1, labels='true', drop_last=True):
    """A training DataLoader of the digits `start`..`start+n` (shuffled, Normalize only); `labels`: 'true', 'shuffled',
    'zero' (every item labelled 0) or None (no label block at all)"""
    items = digits_items(n_channels)[0][start:start + n]
    if labels == 'shuffled': items = [(im, int(y)) for (im, _), y in zip(items, np.random.default_rng(1).permutation([y for _, y in items]))]
    if labels == 'zero': items = [(im, 0) for im, _ in items]
    db = digits_block(n_channels, labels is not None, size, splitter=IndexSplitter([]))
    return db.dataloaders(items, bs=bs, num_workers=0, drop_last=drop_last, device='cpu').train


def normalised(items):
    "The Normalize'd (1, 16, 16) tensors of digit items as `unlab_dl` makes them, to recognise unlabelled images"
    dl = digits_block(splitter=IndexSplitter([])).dataloaders(items, bs=len(items), num_workers=0, device='cpu').train.new(shuffle=False)
    return dl.one_batch()[0].as_subclass(torch.Tensor)


def learner(dls, udl, explicit=False, **kwargs):
    "`CDSCallback(unlabelled=udl)`, or (`explicit`) `CDSCallback()` and `SemiSupervisedCallback(udl)`"
    cbs = [CDSCallback(verbose=False, **kwargs), SemiSupervisedCallback(udl)] if explicit else CDSCallback(unlabelled=udl, verbose=False, **kwargs)
    learn = no_bar(Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=cbs))
    learn.logger = lambda *_: None  # no table printed
    return learn


def counter(learn):
    "Count the batches that begin (training or validation)"
    n = [0]
    learn.add_cb(Spy(-20, before_batch=lambda: n.__setitem__(0, n[0] + 1)))
    return n


@pytest.fixture
def drawn(monkeypatch):
    "Record every unlabelled batch `UnlabelledViews.next` hands out, and the `UnlabelledViews` itself"
    rec = {'batches': [], 'views': []}
    orig = UnlabelledViews.next
    def next_(self):
        u = orig(self)
        rec['batches'].append(u.as_subclass(torch.Tensor).clone())
        rec['views'].append(self)
        return u
    monkeypatch.setattr(UnlabelledViews, 'next', next_)
    return rec


# ---------------------------------------------------------------- 1. the mixed loss
@pytest.mark.parametrize('supervised', [True, False])
def test_unlabelled_images_get_distinct_negative_ids(drawn, supervised):
    "CDSCallback's ids of a batch: the labels (or 0..N-1 for SimCLR), then one distinct negative id per unlabelled image"
    set_seed(0)
    n, m = 8, 6
    learn = learner(lab_dls(bs=n), unlab_dl(bs=m), supervised=supervised)
    seen = []
    learn.add_cb(Spy(100, after_loss=lambda: learn.training and seen.append(
        ([i.clone() for i in learn.cds.ids], learn.y.as_subclass(torch.Tensor).clone(), learn.cds.taps.x.shape[0]))))
    learn.fit(1, 1e-3)
    assert len(seen) == len(learn.dls.train) == 8 and len(drawn['batches']) == 8
    for ids, y, rows in seen:
        assert len(ids) == 2 and rows == 2 * (n + m)
        assert torch.equal(ids[0], y if supervised else torch.arange(n))
        u = ids[1].tolist()
        assert len(u) == len(set(u)) == m and all(i < 0 for i in u)  # distinct, and never a class label


@pytest.mark.parametrize('kwargs', [
    dict(), dict(supervised=False), dict(ce_views=2, weight=0.5, supervised=False),
    dict(ce_views=2, weight=0.5)])
def test_mixed_loss_equals_hand_computation(drawn, kwargs):
    """Forward layout [labelled v1 (N), labelled v2 (N), unlabelled v1 (M), unlabelled v2 (M)]; CE on labelled view 1
    (or both views); SupCon with class labels for labelled items and a unique id for each unlabelled one"""
    set_seed(0)
    n, m = 8, 6
    learn = learner(lab_dls(bs=n), unlab_dl(bs=m), **kwargs)
    got = {}
    ds = learn.model
    h = ds.model.register_forward_hook(lambda mod, i, o: got.update(
        inp=i[0].detach().as_subclass(torch.Tensor).clone(), out=o.detach().as_subclass(torch.Tensor).double()))
    learn.add_cbs([Spy(-10, before_batch=lambda: got.update(x=learn.x.as_subclass(torch.Tensor).clone(),
                                                            y=learn.y.as_subclass(torch.Tensor).clone())),
                   Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach().double(), npred=learn.pred.shape[0],
                                                          taps=learn.cds.taps),
                       after_batch=stop)])
    try: learn.fit(1)
    finally: h.remove()
    x, y, u = got['x'], got['y'], drawn['batches'][0]
    assert x.shape[0] == 2 * n and u.shape[0] == 2 * m and len(drawn['batches']) == 1
    torch.testing.assert_close(got['inp'], torch.cat([x[:n], x[n:], u[:m], u[m:]]))
    torch.testing.assert_close(got['taps'].x.as_subclass(torch.Tensor), got['inp'])
    out = got['out']
    ce_views = kwargs.get('ce_views', 1)
    assert got['npred'] == ce_views * n
    ce = F.cross_entropy(out[:n], y) if ce_views == 1 else F.cross_entropy(out[:2 * n], torch.cat([y, y]))
    ids = torch.cat([y, 1000 + torch.arange(m)]) if kwargs.get('supervised', True) else torch.arange(n + m)
    heads = [z.detach().as_subclass(torch.Tensor).double() for z in got['taps'].heads]
    assert len(heads) == 3 and all(z.shape[0] == 2 * (n + m) for z in heads)
    # the rows in the order of the reference (rows i and i + N + M: two views of one image): [v1, u1, v2, u2]
    order = torch.cat([torch.arange(n), 2 * n + torch.arange(m), n + torch.arange(n), 2 * n + m + torch.arange(m)])
    heads = [z[order] for z in heads]
    contra = [ref_supcon(z, ids) for z in heads]
    torch.testing.assert_close(got['loss'], ce + kwargs.get('weight', 0.1) * sum(contra), rtol=1e-5, atol=1e-4)
    hist = learn.loss_terms.history
    for k, c in enumerate(contra): assert abs(float(hist[f'contra_{k}'][0]) - c.item()) < 1e-4
    if kwargs.get('supervised', True):  # the unlabelled ids matter: SimCLR over everything is another number
        assert abs(ref_supcon(heads[0], torch.arange(n + m)).item() - contra[0].item()) > 1e-3


def test_unlabelled_labels_never_reach_the_loss():
    "Same unlabelled images with their labels, shuffled labels or no labels at all: the same losses, batch by batch"
    def losses(**kw):
        set_seed(0)
        learn = learner(lab_dls(), unlab_dl(n=24, bs=8, **kw))
        learn.fit(1, 1e-3)  # 4 steps: the 3-batch unlabelled loader restarts once
        return [float(v) for v in learn.recorder.losses]
    ref = losses(labels='true')
    assert len(ref) == 4
    assert losses(labels='shuffled') == ref
    assert losses(labels=None) == ref
    assert losses(labels='true', start=900) != ref  # the unlabelled images do count: other images, other losses


def test_shorthand_and_explicit_callback_train_the_same():
    "CDSCallback(unlabelled=udl) adds a SemiSupervisedCallback(udl): the same losses as adding it by hand"
    def run(explicit):
        set_seed(0)
        udl = unlab_dl()
        learn = learner(lab_dls(), udl, explicit=explicit)
        semi = [cb for cb in learn.cbs if isinstance(cb, SemiSupervisedCallback)]
        assert len(semi) == 1 and semi[0].dl is udl and semi[0].order > learn.cds.order
        learn.fit(1, 1e-3)
        return learn, [float(v) for v in learn.recorder.losses]
    learn, short = run(False)
    assert run(True)[1] == short and len(short) == 4
    # the companion leaves (and comes back) with CDSCallback
    cds = learn.cds
    learn.remove_cb(cds)
    assert not any(isinstance(cb, SemiSupervisedCallback) for cb in learn.cbs)
    learn.add_cb(cds)
    assert sum(isinstance(cb, SemiSupervisedCallback) for cb in learn.cbs) == 1


def test_semi_supervised_callback_without_cds_is_rejected_at_fit_start():
    learn = no_bar(Learner(lab_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=SemiSupervisedCallback(unlab_dl())))
    n = counter(learn)
    with pytest.raises(ValueError, match=r'add a CDSCallback.*CDSCallback\(unlabelled=udl\)'): learn.fit(1)
    assert n[0] == 0


def test_unlabelled_views_check_takes_a_shape():
    views = UnlabelledViews(unlab_dl(), simclr_tfms(n_channels=1))
    views.check((1, 16, 16))
    with pytest.raises(ValueError, match=r'Unlabelled images are \(1, 16, 16\) but labelled ones \(3, 16, 16\)'):
        views.check((3, 16, 16))
    u = views.next()
    assert u.shape == (16, 1, 16, 16)  # cat(view 1, view 2) of a batch of 8


# ---------------------------------------------------------------- 2. the unlabelled loader's cycle
def test_unlabelled_loader_cycles_independently(drawn):
    "4 labelled batches per epoch, 3 unlabelled ones per cycle: 2 epochs = 8 steps, every cycle a reshuffled full pass"
    set_seed(0)
    items = digits_items(1)[0][500:524]
    learn = learner(lab_dls(n_train=64, bs=16), unlab_dl(n=24, bs=8))
    steps = []
    learn.add_cb(Spy(0, after_batch=lambda: learn.training and steps.append((learn.epoch, learn.iter))))
    learn.fit(2, 1e-3)
    assert steps == [(e, i) for e in range(2) for i in range(4)]  # an epoch is the labelled loader's length
    assert len(drawn['batches']) == 8
    views = drawn['views']
    assert all(v is views[0] for v in views[:8])
    assert views[0].restarts == 2  # draws 1-3, restart, 4-6, restart, 7-8
    # view 1 of the unlabelled batch is the unlabelled loader's own pipeline (Normalize only): recognise the items
    ref = normalised(items)
    def which(u):
        d = (u[:8, None] - ref[None]).flatten(2).abs().amax(2)  # (8, 24)
        assert (d.min(1).values < 1e-5).all()
        return d.argmin(1).tolist()
    order = [which(u) for u in drawn['batches']]
    for c in range(2):  # two complete cycles: each item exactly once
        seen = sum(order[3 * c:3 * c + 3], [])
        assert sorted(seen) == list(range(24))
    assert sum(order[:3], []) != sum(order[3:6], [])  # its own shuffling, new at every cycle


def test_a_new_fit_starts_a_new_unlabelled_cycle(drawn):
    set_seed(0)
    learn = learner(lab_dls(n_train=32, bs=16), unlab_dl(n=24, bs=8))
    learn.fit(1, 1e-3)
    learn.fit(1, 1e-3)
    assert len(drawn['batches']) == 4
    assert drawn['views'][0] is not drawn['views'][2] and drawn['views'][2].restarts == 0


# ---------------------------------------------------------------- 3. BatchNorm, validation
def test_batchnorm_sees_labelled_and_unlabelled_together(drawn):
    set_seed(0)
    n, m = 8, 6
    learn = learner(lab_dls(bs=n), unlab_dl(bs=m))
    bn = next(mod for mod in learn.model.model.modules() if is_bn(mod))
    got = {}
    h = bn.register_forward_hook(lambda mod, i, o: got.update(inp=i[0].detach().as_subclass(torch.Tensor).clone()))
    before = bn.running_mean.clone()
    learn.add_cb(Spy(100, after_batch=stop))
    learn.fit(1)
    h.remove()
    inp = got['inp']
    assert inp.shape[0] == 2 * n + 2 * m
    # the running mean moved by the statistics of the whole mixed batch
    torch.testing.assert_close(bn.running_mean, (1 - bn.momentum) * before + bn.momentum * inp.mean((0, 2, 3)))


def test_validation_is_untouched(drawn):
    set_seed(0)
    learn = learner(lab_dls(), unlab_dl())
    sizes, head_calls = [], [0]
    ds = learn.model
    hs = [ds.model.register_forward_hook(lambda mod, i, o: sizes.append((learn.training, i[0].shape[0])))]
    hs += [hd.register_forward_hook(lambda *_: head_calls.__setitem__(0, head_calls[0] + (not learn.training))) for hd in ds.heads]
    learn.fit(1, 1e-3)
    n_drawn = len(drawn['batches'])
    loss = learn.validate()[0]
    for h in hs: h.remove()
    assert [s for t, s in sizes if t] == [2 * 16 + 2 * 8] * 4
    assert [s for t, s in sizes if not t] == [16, 16]  # fit's validation and validate(): plain batches
    assert head_calls[0] == 0 and len(drawn['batches']) == n_drawn == 4
    plain = ds.model.eval()
    with torch.no_grad():
        xb, yb = learn.dls.valid.one_batch()
        ref = F.cross_entropy(plain(xb).as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)).item()
    assert abs(loss - ref) < 1e-5


# ---------------------------------------------------------------- 4. export
CHILD = BLOCKED + textwrap.dedent("""
    learn = load_learner(f'{d}/semi.pkl')
    m = learn.model.eval()
    with torch.no_grad():
        pred = m(torch.load(f'{d}/x.pt'))
    torch.save(pred, f'{d}/pred.pt')
    json.dump({'blocked': blocked, 'keys': list(m.state_dict()), 'type': type(m).__module__ + '.' + type(m).__qualname__,
               'cbs': [type(cb).__module__ for cb in learn.cbs],
               'loaded': [k for k, v in sys.modules.items() if k.startswith('fastai_cds') and v is not None]},
              open(f'{d}/res.json', 'w'))
""")


@pytest.mark.slow  # CI's time: a fresh process importing fastai (~10 s); tests/test_export.py loads exports without fastai_cds in CI
def test_export_is_plain_and_loads_without_fastai_cds(tmp_path):
    set_seed(0)
    learn = learner(lab_dls(), unlab_dl())
    learn.fit(1, 1e-3)
    learn.export(tmp_path / 'semi.pkl')
    x = learn.dls.valid.one_batch()[0].as_subclass(torch.Tensor).clone()
    torch.save(x, tmp_path / 'x.pt')
    plain = learn.model.model.eval()
    with torch.no_grad(): pred = plain(x)
    run_children((CHILD, tmp_path))
    res = json.load(open(tmp_path / 'res.json'))
    assert res['blocked'] and res['loaded'] == []
    assert res['keys'] == list(tiny_cnn().state_dict()) and res['type'] == 'torch.nn.modules.container.Sequential'
    assert not any(c.startswith('fastai_cds') for c in res['cbs'])
    torch.testing.assert_close(torch.load(tmp_path / 'pred.pt'), pred, atol=1e-5, rtol=0)
    assert ours(tmp_path / 'semi.pkl') == []
    with zipfile.ZipFile(tmp_path / 'semi.pkl') as z: members = b''.join(z.read(n) for n in z.namelist())
    assert next(learn.model.heads[0].parameters()).detach().numpy().tobytes() not in members  # no head weights inside


# ---------------------------------------------------------------- 5. bad input: clear errors when fit starts
@pytest.mark.parametrize('case,match', [
    ('empty', 'unlabelled DataLoader is empty'),
    ('size', r'Unlabelled images are \(1, 8, 8\) but labelled ones \(1, 16, 16\)'),
    ('channels', r'Unlabelled images are \(3, 16, 16\) but labelled ones \(1, 16, 16\)'),
    ('labelled_bs_1', 'batch size of at least 2'),
])
def test_bad_input_fails_when_fit_starts(case, match):
    udl = {'empty': lambda: unlab_dl(n=6, bs=8), 'size': lambda: unlab_dl(size=8),
           'channels': lambda: unlab_dl(n_channels=3), 'labelled_bs_1': lambda: unlab_dl()}[case]()
    if case == 'empty': assert len(udl) == 0 and len(udl.dataset) == 6  # a short last batch, dropped
    dls = lab_dls(n_train=8, bs=1) if case == 'labelled_bs_1' else lab_dls()
    learn = learner(dls, udl)
    n = counter(learn)
    with pytest.raises(ValueError, match=match): learn.fit(1)
    assert n[0] == 0


# ---------------------------------------------------------------- 6. split_labelled on any fastai DataLoaders
def index_dls(n=300, bs=16):
    "DataLoaders whose items are digit indices (to see which item went where)"
    items, labels = digits_items(1)
    db = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), n_inp=1,
                   getters=[lambda i: items[i][0], lambda i: int(labels[i])],
                   splitter=IndexSplitter(list(range(n - 60, n))), item_tfms=Resize(8),
                   batch_tfms=[Normalize.from_stats([MEAN], [STD], cuda=False)])
    return db.dataloaders(list(range(n)), bs=bs, num_workers=0, device='cpu')


def datasets_dls(n=300, bs=16):
    "DataLoaders built from `Datasets` and transforms lists, no DataBlock"
    items, labels = digits_items(1)
    tfms = [[lambda i: items[i][0], PILImageBW.create, ToTensor()], [lambda i: int(labels[i]), Categorize()]]
    dsets = Datasets(list(range(n)), tfms, splits=[list(range(n - 60)), list(range(n - 60, n))])
    return dsets.dataloaders(bs=bs, after_batch=[IntToFloatTensor()], num_workers=0, device='cpu')


@pytest.mark.parametrize('make', [index_dls, datasets_dls])
def test_split_labelled_stratified_disjoint_seeded(make):
    dls = make()
    labels = digits_items(1)[1]
    train_items = list(dls.train_ds.items)
    lab, udl = split_labelled(dls, 0.2, seed=0)
    l_items, u_items = list(lab.train_ds.items), list(udl.dataset.items)
    assert not set(l_items) & set(u_items) and sorted(l_items + u_items) == sorted(train_items)
    per_class = Counter(int(labels[i]) for i in train_items)
    got = Counter(int(labels[i]) for i in l_items)
    assert got == {c: max(1, round(0.2 * k)) for c, k in per_class.items()}
    # the labels of the labelled part are the originals
    assert [int(lab.train_ds[k][1]) for k in range(5)] == [dls.vocab.o2i[int(labels[i])] for i in l_items[:5]]
    # seeded
    lab2, udl2 = split_labelled(make(), 0.2, seed=0)
    assert list(lab2.train_ds.items) == l_items and list(udl2.dataset.items) == u_items
    lab3, _ = split_labelled(make(), 0.2, seed=1)
    assert list(lab3.train_ds.items) != l_items
    # loaders: the validation set untouched, the unlabelled one shuffled with full batches, same transforms
    assert list(lab.valid_ds.items) == list(dls.valid_ds.items)
    assert udl.shuffle and udl.drop_last and udl.bs == dls.train.bs == lab.train.bs
    assert split_labelled(make(), 0.2, unlabelled_bs=5)[1].bs == 5
    xb = udl.one_batch()[0]
    assert xb.shape == (16, *dls.one_batch()[0].shape[1:])
    assert [type(t) for t in udl.after_batch.fs] == [type(t) for t in dls.train.after_batch.fs]
    with pytest.raises(ValueError, match='leaves no unlabelled items'): split_labelled(make(), 1.)
    with pytest.raises(ValueError, match=r'fraction must be in \(0, 1\]'): split_labelled(make(), 0.)


def test_split_labelled_trains_semi_supervised():
    "The split of a DataBlock's DataLoaders trains with CDSCallback(unlabelled=...) end to end"
    set_seed(0)
    lab, udl = split_labelled(lab_dls(n_train=96, bs=8), 0.5, seed=0)
    learn = learner(lab, udl)
    learn.fit(1, 1e-3)
    assert len(learn.recorder.losses) == len(lab.train) == 6 and all(np.isfinite(float(v)) for v in learn.recorder.losses)
