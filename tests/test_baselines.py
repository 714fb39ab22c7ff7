"Tests of `fastai_cds.baselines` (DSN, DKS, DHM) inside real fastai training loops, against independent expectations."
import json
import math
import re
import textwrap

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import CancelFitException
from fastai.callback.mixup import MixUp
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat

from fastai_cds.baselines import METHODS, DHMCallback, DKSCallback, DSNCallback, method_callbacks
from fastai_cds.cds import CDSCallback
from fastai_cds.digits import digits_items, digits_splits
from fastai_cds.heads import AuxClassifier
from fastai_cds.losses import pairwise_kl
from fastai_cds.model import DeepSupervisionModel
from fastai_cds.precision import DeviceMixedPrecision
from fastai_cds.views import simclr_tfms

from helpers import BLOCKED, Spy, hooked_modules, no_bar, ref_ce, ref_kl, run_children, ours, snapshot, stop, tiny_cnn

pytestmark = pytest.mark.usefixtures("seeded")  # set_seed(0) before every test (conftest.py, like the `dls` fixture)


def learner(dls, cb, **kwargs):
    "`tiny_cnn`: stages '0', '1', '2' (stride 2 each); '2' is the final feature map"
    return no_bar(Learner(dls, tiny_cnn(), loss_func=kwargs.pop("loss_func", CrossEntropyLossFlat()), cbs=cb, **kwargs))


def stop_after(n):
    k = [0]
    def f():
        k[0] += 1
        if k[0] >= n: raise CancelFitException()
    return f


# ---------------------------------------------------------------- independent references (float64: `helpers`)
def ref_loss(method, kw, aux, final, y):
    "The loss of `method` from the captured logits; classifier k-1 is the final one"
    alpha, beta, T = kw.get("alpha", 1.), kw.get("beta", 1.), kw.get("T", 1.)
    ce = ref_ce(final, y)
    aux_ce = [ref_ce(a, y) for a in aux]
    total = ce + alpha * sum(aux_ce)
    cls = aux + [final]
    k, kl = len(cls), torch.zeros((), dtype=torch.float64)
    for s in range(k):
        for t in range(k):
            if s == t: continue
            if method == "dhm" and not kw.get("final_mimics", True) and s == k - 1: continue
            kl = kl + ref_kl(cls[s], cls[t], T)
    if method == "dhm": kl = kl * T ** 2
    if method != "dsn": total = total + beta * kl
    return total, ce, aux_ce, kl


def capture_one_step(learn):
    """Run one training batch; returns hard labels, aux logits (forward hooks on the heads), final logits (forward hook
    on the plain model), the loss, and what the callback read (`taps`)"""
    got, aux = {}, []
    ds = learn.model
    hs = [h.register_forward_hook(lambda m, i, o: aux.append(o.detach())) for h in ds.heads]
    hs.append(ds.model.register_forward_hook(lambda m, i, o: got.update(final=o.detach())))
    cb = next(c for c in learn.cbs if isinstance(c, DSNCallback))
    spies = [Spy(-10, before_batch=lambda: got.update(y=learn.y.as_subclass(torch.Tensor).clone())),
             Spy(100, after_loss=lambda: got.update(loss=learn.loss_grad.detach(), lossd=learn.loss, taps=cb.taps),
                 after_batch=stop)]
    learn.add_cbs(spies)
    learn.fit(1)
    learn.remove_cbs(spies)
    for h in hs: h.remove()
    assert len(got['taps'].heads) == len(aux) and all(torch.equal(a, t.detach()) for a, t in zip(aux, got['taps'].heads))
    return got, aux


CB = {"dsn": DSNCallback, "dks": DKSCallback, "dhm": DHMCallback}
CASES = [("dsn", {}), ("dsn", dict(alpha=0.3)), ("dks", {}), ("dks", dict(beta=0.7, T=2.)),
         ("dhm", {}), ("dhm", dict(beta=0.5, T=3.)), ("dhm", dict(T=2., final_mimics=False, alpha=0.5))]


# ---------------------------------------------------------------- 1. loss composition
@pytest.mark.parametrize("method,kw", CASES)
def test_loss_equals_hand_computation(dls, method, kw):
    learn = learner(dls, CB[method](verbose=False, **kw))
    assert [s.name for s in getattr(learn, method).stages] == ["0", "1"]  # the final map '2' gets no aux
    assert all(isinstance(h, AuxClassifier) for h in learn.model.heads)
    got, aux = capture_one_step(learn)
    y, final = got["y"], got["final"]
    assert y.dtype == torch.int64 and final.shape == (len(y), 10)
    assert len(aux) == 2 and all(a.shape == final.shape for a in aux)
    expected, ce, aux_ce, kl = ref_loss(method, kw, aux, final, y)
    assert got["loss"].dtype == torch.float32 and got["loss"].shape == ()
    assert abs(got["loss"].item() - expected.item()) < 1e-4
    assert abs(got["lossd"].item() - expected.item()) < 1e-4
    # the recorded terms are the unweighted pieces
    hist = learn.loss_terms.history
    assert abs(float(hist["ce"][-1]) - ce.item()) < 1e-4
    for i, a in enumerate(aux_ce): assert abs(float(hist[f"aux_{i}"][-1]) - a.item()) < 1e-4
    if method == "dsn": assert "kl" not in hist
    else:
        assert abs(float(hist["kl"][-1]) - kl.item()) < 1e-4
        assert kl.item() > 1e-4  # the classifiers disagree at init: the term is not trivially 0


def test_dks_and_dhm_coincide_at_t1_and_dhm_scales_by_t2(dls):
    "Independent of the implementation's pair rule: DHM(T) = T^2 * DKS(T) on the same logits"
    logits = [torch.randn(6, 10) for _ in range(3)]
    dks, dhm = DKSCallback(T=2.5), DHMCallback(T=2.5)
    k_dks, k_dhm = dks.mimicry(logits)["kl"], dhm.mimicry(logits)["kl"]
    torch.testing.assert_close(k_dhm, 2.5 ** 2 * k_dks)
    manual = sum(ref_kl(logits[s], logits[t], 2.5) for s in range(3) for t in range(3) if s != t)
    assert abs(k_dks.item() - manual.item()) < 1e-5


def test_mixup_aux_classifiers_get_hard_labels(dls):
    "With MixUp the learner's loss is the mixed one, the auxiliary cross-entropies use the unmixed labels"
    learn = learner(dls, DSNCallback(verbose=False))
    mix = MixUp(0.4)
    learn.add_cb(mix)
    mixed = {}
    learn.add_cb(Spy(50, after_loss=lambda: mixed.update(lam=mix.lam.clone(), y1=mix.yb1[0].as_subclass(torch.Tensor).clone())))
    got, aux = capture_one_step(learn)
    y, lam, y1 = got["y"], mixed["lam"].double(), mixed["y1"]
    ce_rec = float(learn.loss_terms.history["ce"][-1])
    aux_expected = sum(ref_ce(a, y) for a in aux)
    assert abs(got["loss"].item() - (ce_rec + aux_expected.item())) < 1e-4
    # and the learner's own loss was the mixed one: per image, lam x CE(label) + (1 - lam) x CE(label of its partner)
    final = got["final"]
    per_image = lambda t: torch.stack([ref_ce(final[i:i + 1], t[i:i + 1]) for i in range(len(t))])
    assert abs(ce_rec - (lam * per_image(y) + (1 - lam) * per_image(y1)).mean().item()) < 1e-4
    assert ((lam < 0.99) & (y1 != y)).any()  # really mixed: some images took weight from a partner of another class


def test_losses_in_fp32_under_bf16_autocast(dls):
    learn = learner(dls, DKSCallback(T=2., verbose=False))
    learn.add_cb(DeviceMixedPrecision())
    got, aux = capture_one_step(learn)
    assert got["final"].dtype == torch.bfloat16 and all(a.dtype == torch.bfloat16 for a in aux)  # autocast was on
    assert got["loss"].dtype == torch.float32 and torch.isfinite(got["loss"])
    expected = ref_loss("dks", dict(T=2.), aux, got["final"], got["y"])[0]
    assert abs(got["loss"].item() - expected.item()) < 1e-3 * max(1., expected.item())


# ---------------------------------------------------------------- 2. gradients
@pytest.mark.parametrize("method,kw,fc_grad,stage_grads", [
    ("dsn", dict(alpha=1.), False, [True, True, False]),
    ("dsn", dict(alpha=0.), False, [False, False, False]),
    ("dks", dict(alpha=0.), True, [True, True, True]),  # KL only: the final classifier is a student too
    ("dhm", dict(alpha=0., final_mimics=False), False, [True, True, False]),
])
def test_gradients_reach_hooked_stages(dls, method, kw, fc_grad, stage_grads):
    "With the learner's loss zeroed, only the deep-supervision terms give gradients"
    learn = learner(dls, CB[method](verbose=False, **kw), loss_func=lambda pred, y: 0 * pred.sum())
    plain = learn.model.model
    convs = [plain[i][0].weight for i in range(3)]
    grads = {}
    learn.add_cb(Spy(100, after_backward=lambda: grads.update(
        convs=[c.grad.clone() for c in convs], fc=plain[-1].weight.grad.clone(),
        heads=[[p.grad.clone() for p in h.parameters() if p.grad is not None] for h in learn.model.heads]),
        after_batch=stop))
    learn.fit(1)
    assert (torch.count_nonzero(grads["fc"]) > 0) == fc_grad
    assert [bool(torch.count_nonzero(g) > 0) for g in grads["convs"]] == stage_grads
    any_aux = kw.get("alpha", 1.) > 0 or method != "dsn"
    for hg in grads["heads"]:
        assert hg and any(torch.count_nonzero(g) > 0 for g in hg) == any_aux


# ---------------------------------------------------------------- 3. training, recorder, save/load
@pytest.mark.parametrize("method", ["dsn", "dks", "dhm"])
def test_heads_train_record_and_save_load(dls, method, tmp_path):
    learn = learner(dls, CB[method](verbose=False), path=tmp_path)
    heads0, body0 = snapshot(learn.model.heads), snapshot(learn.model.model)
    n_heads = [0]
    hs = [h.register_forward_hook(lambda *_: n_heads.__setitem__(0, n_heads[0] + 1)) for h in learn.model.heads]
    learn.add_cb(Spy(100, after_batch=lambda: None))
    learn.fit(1, 1e-2)
    n_train = len(dls.train)
    assert n_heads[0] == 2 * n_train  # every training batch, both heads; never in validation
    for h in hs: h.remove()
    changed = [k for k, v in learn.model.heads.state_dict().items() if not torch.equal(v, heads0[k])]
    assert any(k.endswith("weight") for k in changed) and any("running_mean" in k for k in changed)
    assert any(not torch.equal(v, body0[k]) for k, v in learn.model.model.state_dict().items())
    names = list(learn.recorder.metric_names)
    assert names == ["epoch", "train_loss", "valid_loss", "ce", "aux_0", "aux_1"] + ([] if method == "dsn" else ["kl"]) + ["time"]
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])
    assert len(learn.loss_terms.history["aux_0"]) == n_train
    # validation is the plain model's cross-entropy
    m = learn.model.model.eval()
    with torch.no_grad():
        logits = torch.cat([m(xb).as_subclass(torch.Tensor) for xb, _ in dls.valid])
    ys = torch.cat([yb.as_subclass(torch.Tensor) for _, yb in dls.valid])
    assert abs(learn.validate()[0] - F.cross_entropy(logits, ys).item()) < 1e-5
    assert learn.model.armed is False and hooked_modules(learn.model) == []

    f = learn.save("x")
    sd = torch.load(f, map_location="cpu", weights_only=False)["model"]
    assert {k for k in sd if k.startswith("heads.")} == {f"heads.{k}" for k in learn.model.heads.state_dict()}
    learn2 = learner(dls, CB[method](verbose=False), path=tmp_path)
    h1 = snapshot(learn.model.heads)
    assert any(not torch.equal(v, learn2.model.heads.state_dict()[k]) for k, v in h1.items() if v.is_floating_point())
    learn2.load("x")
    for k, v in learn2.model.heads.state_dict().items(): assert torch.equal(v, h1[k]), k
    for k, v in learn2.model.model.state_dict().items(): assert torch.equal(v, learn.model.model.state_dict()[k]), k


# ---------------------------------------------------------------- 4. clean export
CHILD = BLOCKED + textwrap.dedent("""
    inputs = torch.load(f'{d}/inputs.pt', weights_only=False)
    res, out = {}, {}
    for kind in sys.argv[2:]:
        learn = load_learner(f'{d}/{kind}.pkl')
        m = learn.model.eval()
        with torch.no_grad(): pred = m(inputs['x'])
        preds, _ = learn.get_preds(dl=learn.dls.test_dl(inputs['items']))
        out[kind] = {'pred': pred, 'preds': preds}
        res[kind] = {'sd': [[k, list(v.shape)] for k, v in m.state_dict().items()],
                     'types': sorted({type(mod).__module__ for mod in m.modules()}),
                     'cbs': [type(cb).__module__ for cb in learn.cbs],
                     'hooks': [n for n, mod in m.named_modules() if mod._forward_hooks or mod._forward_pre_hooks]}
    res['loaded'] = [k for k, v in sys.modules.items() if k.startswith('fastai_cds') and v is not None]
    torch.save(out, f'{d}/out.pt')
    json.dump(res, open(f'{d}/res.json', 'w'))
""")


@pytest.mark.slow  # CI's time: a fresh process importing fastai (~10 s); tests/test_export.py loads exports without fastai_cds in CI
def test_export_is_plain_and_predicts_the_same(dls, tmp_path):
    kinds = ["dsn", "dks", "dhm"]
    valid = digits_splits(digits_items()[1], 0.2, 1., 0)[2][:12]
    items = [digits_items()[0][i] for i in valid]
    x = dls.valid.one_batch()[0][:8].as_subclass(torch.Tensor).clone()
    torch.save({"x": x, "items": items}, tmp_path / "inputs.pt")
    expected = {}
    for kind in kinds:
        learn, spy = learner(dls, CB[kind](verbose=False)), Spy(100, after_batch=stop_after(3))
        learn.add_cb(spy)
        learn.fit(1, 1e-2)
        learn.remove_cb(spy)
        m = learn.model.model.eval()
        with torch.no_grad(): pred = m(x)
        expected[kind] = (pred, learn.get_preds(dl=dls.test_dl(items))[0])
        learn.export(tmp_path / f"{kind}.pkl")
        assert isinstance(learn.model, DeepSupervisionModel)  # the in-memory learner keeps its heads
        assert ours(tmp_path / f"{kind}.pkl") == []
    run_children((CHILD, tmp_path, *kinds))
    res, out = json.load(open(tmp_path / "res.json")), torch.load(tmp_path / "out.pt", weights_only=False)
    assert res["loaded"] == []
    plain_sd = [[k, list(v.shape)] for k, v in tiny_cnn().state_dict().items()]
    for kind in kinds:
        assert res[kind]["sd"] == plain_sd
        assert not any(t.startswith("fastai_cds") for t in res[kind]["types"] + res[kind]["cbs"])
        assert res[kind]["hooks"] == []
        torch.testing.assert_close(out[kind]["pred"], expected[kind][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[kind]["preds"], expected[kind][1], atol=1e-5, rtol=0)
        assert expected[kind][0].std(0).sum() > 0


# ---------------------------------------------------------------- 5. bad input
@pytest.mark.parametrize("make,match", [
    (lambda: DSNCallback(alpha=-1), "alpha must be >= 0"),
    (lambda: DKSCallback(beta=-0.1), "beta must be >= 0"),
    (lambda: DKSCallback(T=0), "T must be > 0"),
    (lambda: DHMCallback(T=-1), "T must be > 0"),
    (lambda: DHMCallback(alpha=float("nan")), "alpha must be >= 0"),
    (lambda: pairwise_kl([torch.zeros(2, 3)], [], T=0), "T must be > 0"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match): make()


def test_only_the_final_stage_is_rejected(dls):
    "layers= naming only the final map leaves nothing for an auxiliary classifier"
    with pytest.raises(ValueError, match="no stage to supervise"):
        learner(dls, DSNCallback(layers=["2"], verbose=False))
    learn = learner(dls, DSNCallback(layers=["1", "2"], verbose=False))
    assert [s.name for s in learn.dsn.stages] == ["1"] and len(learn.model.heads) == 1


def test_one_deep_supervision_callback_per_learner(dls):
    with pytest.raises(ValueError, match=r"two deep-supervision callbacks \(DSNCallback and CDSCallback\).*use one per Learner"):
        learner(dls, [DSNCallback(verbose=False), CDSCallback(verbose=False)])


# ---------------------------------------------------------------- method_callbacks
def test_method_callbacks_by_name():
    assert METHODS == ('base', 'dsn', 'dks', 'dhm', 'cds', 'cds-simclr')
    assert method_callbacks('base') == []
    (cds,) = method_callbacks('cds', verbose=False)
    assert type(cds) is CDSCallback and cds.supervised and not cds.verbose and cds.view2_tfms is None
    tfms = simclr_tfms(n_channels=1)
    (simclr,) = method_callbacks('cds-simclr', view2_tfms=tfms, weight=0.3)
    assert type(simclr) is CDSCallback and not simclr.supervised and simclr.view2_tfms is tfms and simclr.weight == 0.3
    for name, cls in (('dsn', DSNCallback), ('dks', DKSCallback), ('dhm', DHMCallback)):
        (cb,) = method_callbacks(name, verbose=False)
        assert type(cb) is cls and not cb.verbose


@pytest.mark.parametrize('bad', ['CDS', 'simclr', ''])
def test_method_callbacks_bad_name(bad):
    with pytest.raises(ValueError, match=re.escape(f"method {bad!r}: pick one of base, dsn, dks, dhm, cds, cds-simclr")):
        method_callbacks(bad)
