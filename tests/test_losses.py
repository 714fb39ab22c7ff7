"""Tests of `fastai_cds.losses`: `SupConLoss`, `embedding_distance`, `soft_target_loss` and `pairwise_kl` against the
independent float64 references of `helpers` (anchor-by-anchor SupCon, softmax/KL from their definitions) and hand
computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastai_cds.losses import SupConLoss, embedding_distance, pairwise_kl, soft_target_loss

from helpers import ref_distance, ref_kl, ref_soft, ref_supcon


def rand_z(n=4, dim=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(2 * n, dim, generator=g, dtype=torch.float64), dim=1).to(dtype)


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_simclr_matches_reference(seed, temperature):
    z = rand_z(seed=seed)
    got = SupConLoss(temperature, temperature)(z)
    exp = ref_supcon(z, None, temperature, temperature)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("labels", [[0, 1, 0, 2], [5, 5, 5, 5], [1, 0, 1, 0], [2, 2, 7, 3]])
@pytest.mark.parametrize("temperature", [0.07, 0.3])
def test_supcon_matches_reference(labels, temperature):
    z = rand_z(seed=3)
    lbl = torch.tensor(labels)
    got = SupConLoss(temperature)(z, lbl)
    exp = ref_supcon(z, labels, temperature, 0.07)
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)
    # repeated labels really change the loss (the reference is not trivially the SimCLR one)
    if len(set(labels)) < len(labels):
        assert abs(exp.item() - ref_supcon(z, None, temperature, 0.07).item()) > 1e-3


def test_supcon_labels_shape_n1_accepted():
    "labels of shape (N,1) are flattened"
    z = rand_z(seed=4)
    lbl = torch.tensor([0, 1, 0, 2])
    torch.testing.assert_close(SupConLoss()(z, lbl[:, None]), SupConLoss()(z, lbl))


def test_distinct_labels_equal_simclr():
    z = rand_z(n=6, seed=5)
    crit = SupConLoss(0.2)
    simclr = crit(z)
    for labels in ([0, 1, 2, 3, 4, 5], [9, 3, 7, 1, 0, 4]):
        torch.testing.assert_close(crit(z, torch.tensor(labels)), simclr, rtol=1e-6, atol=1e-6)


def test_temperature_scaling():
    z = rand_z(seed=6)
    base = SupConLoss(0.07, 0.07)(z)
    half = SupConLoss(0.07, 0.14)(z)
    torch.testing.assert_close(half, base / 2, rtol=1e-6, atol=1e-7)
    # a different temperature changes the logits, and base_temperature rescales linearly
    l1, l2 = SupConLoss(0.3, 0.3)(z), SupConLoss(0.3, 0.6)(z)
    torch.testing.assert_close(l2, l1 / 2, rtol=1e-6, atol=1e-7)
    assert not torch.isclose(l1, base)
    torch.testing.assert_close(l1.double(), ref_supcon(z, None, 0.3, 0.3), rtol=1e-5, atol=1e-5)


def test_hand_computed_simclr():
    # views of image 0 are [1,0], of image 1 are [0,1]: for each anchor, its positive has similarity 1,
    # the two other rows similarity 0. loss = -(T/bT) * (1/T - log(2 + e^(1/T)))
    z = torch.tensor([[1., 0.], [0., 1.], [1., 0.], [0., 1.]])
    for t, bt in [(0.5, 0.5), (1.0, 1.0), (0.07, 0.07), (0.5, 0.25)]:
        exp = -(t / bt) * (1 / t - math.log(2 + math.exp(1 / t)))
        assert SupConLoss(t, bt)(z).item() == pytest.approx(exp, rel=1e-5, abs=1e-6)
    # t=b=0.5: log(1 + 2 e^-2)
    assert SupConLoss(0.5, 0.5)(z).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-5)


def test_hand_computed_supcon_one_class():
    # both images share a label: each anchor has 3 positives with similarities 0, 1, 0
    z = torch.tensor([[1., 0.], [0., 1.], [1., 0.], [0., 1.]])
    t = 1.0
    log_denom = math.log(2 * math.exp(0) + math.exp(1 / t))
    exp = -((0 - log_denom) + (1 / t - log_denom) + (0 - log_denom)) / 3
    assert SupConLoss(t, t)(z, torch.tensor([4, 4])).item() == pytest.approx(exp, rel=1e-5)


def test_hand_computed_45_degrees():
    # view pairs at 45 degrees: a=[1,0], b=[s,s], views a,b,a',b' with a'=a, b'=b (s = 1/sqrt 2)
    s = 1 / math.sqrt(2)
    z = torch.tensor([[1., 0.], [s, s], [1., 0.], [s, s]])
    t = 0.5
    # anchor a: others b (s), a' (1), b' (s); positive a'. Same structure for every anchor by symmetry.
    exp = -(1 / t - math.log(math.exp(1 / t) + 2 * math.exp(s / t)))
    assert SupConLoss(t, t)(z).item() == pytest.approx(exp, rel=1e-5)


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input(dtype):
    z = rand_z(n=8, dim=16, seed=7)
    crit = SupConLoss()
    ref = crit(z)
    got = crit(z.to(dtype))
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)
    # computed in fp32 on the upcast values: exactly the fp32 loss of the rounded embeddings
    torch.testing.assert_close(got, crit(z.to(dtype).float()), rtol=1e-6, atol=1e-6)


def test_autocast_bf16():
    z = rand_z(n=8, dim=16, seed=8)
    crit = SupConLoss()
    ref = crit(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit(z)  # fp32 input inside autocast: the matmul must not drop to bf16
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)

    # embeddings produced inside autocast (bf16), loss still fp32 and close
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = F.normalize(lin(x), dim=1)
        assert e.dtype == torch.bfloat16
        got = crit(e)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    ref = crit(F.normalize(lin(x), dim=1))
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [30., 1000.])
def test_large_norm_finite(dtype, scale):
    g = torch.Generator().manual_seed(9)
    z = (torch.randn(8, 8, generator=g) * scale).to(dtype).requires_grad_()
    loss = SupConLoss(0.07)(z, torch.tensor([0, 1, 0, 2]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # cross-check the big-logit regime against float64 (stable-ish here only via the log-sum-exp trick)
    zz = z.detach().double()
    sims = zz @ zz.T / 0.07
    sims.fill_diagonal_(-math.inf)
    log_prob = sims - sims.logsumexp(1, keepdim=True)
    ids = torch.tensor([0, 1, 0, 2] * 2)
    pos = (ids[:, None] == ids[None, :]) & ~torch.eye(8, dtype=torch.bool)
    exp = -(log_prob.where(pos, torch.zeros(())).sum(1) / pos.sum(1)).mean()
    torch.testing.assert_close(loss.double(), exp, rtol=1e-4, atol=1e-2)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("labels", [None, [0, 1, 0, 2]])
def test_gradient_matches_reference(labels):
    g = torch.Generator().manual_seed(10)
    raw = torch.randn(8, 8, generator=g, dtype=torch.float64)
    w = raw.clone().float().requires_grad_()
    lbl = None if labels is None else torch.tensor(labels)
    loss = SupConLoss(0.2)(F.normalize(w, dim=1), lbl)
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0

    w64 = raw.clone().requires_grad_()
    ref_supcon(F.normalize(w64, dim=1), labels, 0.2, 0.07).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('supervised', [True, False])
def test_low_precision_embeddings_with_and_without_labels(dtype, supervised):
    "Embeddings in bf16/fp16 (as heads under autocast give them): an fp32 loss close to the fp32 one, a finite gradient"
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(16, 32, generator=g), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3]) if supervised else None
    crit = SupConLoss()
    ref = ref_supcon(z, labels)
    zl = z.to(dtype).requires_grad_()
    got = crit(zl, labels)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert abs(got.item() - ref.item()) < 1e-2
    got.backward()
    assert zl.grad.dtype == dtype and torch.isfinite(zl.grad).all()


def test_gradient_low_precision_leaf():
    z = rand_z(seed=11, dtype=torch.bfloat16).requires_grad_()
    SupConLoss()(z).backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()
    assert z.grad.float().abs().sum() > 0


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,name", [
    (dict(temperature=0.), "temperature"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(base_temperature=0.), "base_temperature"), (dict(base_temperature=-1.), "base_temperature"),
])
def test_bad_temperature(kw, name):
    with pytest.raises(ValueError, match=rf"{name} must be > 0"):
        SupConLoss(**kw)


@pytest.mark.parametrize("shape", [(8,), (2, 4, 8), (7, 8)])
def test_bad_embedding_shape(shape):
    with pytest.raises(ValueError, match=r"shape \(2N, dim\).*" + re_tuple(shape)):
        SupConLoss()(torch.randn(*shape))


def re_tuple(shape):
    import re
    return re.escape(str(tuple(shape)))


def test_too_few_images():
    with pytest.raises(ValueError, match=r"at least 1 image.*got 0"):
        SupConLoss()(F.normalize(torch.randn(0, 8), dim=1))


@pytest.mark.parametrize("labels", [None, torch.tensor([3])])
def test_one_image_is_zero_with_a_gradient(labels):
    "One image: its other view is its only other row and a positive (log-prob 0); the graph reaches the embeddings (DDP)"
    z = torch.randn(2, 8, requires_grad=True)
    loss = SupConLoss()(F.normalize(z, dim=1), labels)
    assert loss.item() == 0.
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("labels", [[0, 1, 0], [0, 1, 0, 1, 2, 3, 4, 5], [0]])
def test_wrong_number_of_labels(labels):
    with pytest.raises(ValueError, match=rf"{len(labels)} labels for 4 images"):
        SupConLoss()(rand_z(), torch.tensor(labels))


# ---------------------------------------------------------------- embedding_distance
def emb_pair(b=6, d=5, seed=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


@pytest.mark.parametrize("squared", [False, True])
def test_embedding_distance_matches_reference(squared):
    s, t = emb_pair()
    got = embedding_distance(s, t, squared)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got.double(), ref_distance(s, t, squared), rtol=1e-5, atol=1e-6)
    # the two definitions really differ on this batch
    assert abs(ref_distance(s, t, True).item() - ref_distance(s, t, False).item()) > 1e-2


def test_embedding_distance_hand_computed():
    s, t = torch.zeros(2, 2), torch.tensor([[3., 4.], [0., 0.]])
    assert embedding_distance(s, t).item() == pytest.approx(5.)  # the norm of the whole difference
    assert embedding_distance(s, t, squared=True).item() == pytest.approx(25. / 2)  # mean over rows of ||t_i - s_i||^2
    assert embedding_distance(t, t).item() == 0.


def test_embedding_distance_fp32_under_autocast_and_gradient():
    s, t = emb_pair()
    sb = s.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = embedding_distance(sb, t.to(torch.bfloat16), squared=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_distance(s, t, True), rtol=2e-2, atol=1e-2)
    got.backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all() and sb.grad.float().abs().sum() > 0


# ---------------------------------------------------------------- soft_target_loss
def logits_pair(b=8, c=10, seed=13):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(b, c, generator=g), 3 * torch.randn(b, c, generator=g)


@pytest.mark.parametrize("T", [1., 3.])
@pytest.mark.parametrize("kl", [False, True])
def test_soft_target_loss_matches_reference(T, kl):
    s, t = logits_pair()
    got = soft_target_loss(s, t, T, kl)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got.double(), ref_soft(s, t, T, kl), rtol=1e-5, atol=1e-5)


def test_soft_target_loss_hand_computed():
    "Same logits: KL is 0 and the soft cross-entropy is the teacher's entropy; uniform teacher: mean -log p_s / c"
    s, _ = logits_pair()
    assert abs(soft_target_loss(s, s, 2., kl=True).item()) < 1e-5
    p = F.softmax(s.double() / 2., 1)
    torch.testing.assert_close(soft_target_loss(s, s, 2.).double(), -(p * p.log()).sum(1).mean(), rtol=1e-5, atol=1e-6)
    u = torch.zeros_like(s)
    exp = -F.log_softmax(s.double() / 3., 1).mean(1).mean()
    torch.testing.assert_close(soft_target_loss(s, u, 3.).double(), exp, rtol=1e-5, atol=1e-6)


def test_soft_target_loss_fp32_from_bf16():
    s, t = logits_pair()
    got = soft_target_loss(s.to(torch.bfloat16), t.to(torch.bfloat16), 3., kl=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_soft(s, t, 3., True), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- pairwise_kl
def three_logits(seed=14):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 10, generator=g) for _ in range(3)]


@pytest.mark.parametrize("T,scale", [(1., 1.), (2.5, 2.5 ** 2), (0.5, 1.)])
def test_pairwise_kl_matches_sum_of_references(T, scale):
    logits = three_logits()
    pairs = [(0, 2), (1, 2), (2, 0)]
    got = pairwise_kl(logits, pairs, T, scale)
    assert got.dtype == torch.float32 and got.ndim == 0
    exp = scale * sum(ref_kl(logits[s], logits[t], T) for s, t in pairs)
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6)
    assert exp.item() > 1e-3  # the classifiers disagree: not trivially 0


def test_pairwise_kl_teacher_side_is_detached():
    "A pair (student, teacher) sends gradient to the student's logits only"
    a, b = [l.requires_grad_() for l in three_logits()[:2]]
    pairwise_kl([a, b], [(0, 1)]).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert b.grad is None
    # the gradient of the batch-mean KL w.r.t. the student's logits at T=1: (softmax(a) - softmax(b)) / B
    torch.testing.assert_close(a.grad, (F.softmax(a.detach(), 1) - F.softmax(b.detach(), 1)) / len(a), rtol=1e-5, atol=1e-7)


def test_pairwise_kl_no_pairs_is_zero_and_bad_input():
    logits = three_logits()
    got = pairwise_kl(logits, [])
    assert got.dtype == torch.float32 and got.item() == 0.
    with pytest.raises(ValueError, match="T must be > 0"): pairwise_kl(logits, [(0, 1)], T=0)
    with pytest.raises(ValueError, match="no logits"): pairwise_kl([], [])
