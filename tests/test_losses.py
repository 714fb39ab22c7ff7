"Tests of `fastai_cds.losses.SupConLoss` against an independent, loop-based float64 reference."
import math

import pytest
import torch
import torch.nn.functional as F

from fastai_cds.losses import SupConLoss


# ---------------------------------------------------------------- reference
def ref_supcon(z, labels=None, temperature=0.07, base_temperature=0.07):
    """Dense SupCon / SimCLR loss with explicit python loops, in float64.

    Rows i and i+N of `z` are two views of image i. For each anchor i the positives are the other
    rows with the same label, the denominator runs over every row but i. Differentiable w.r.t. `z`.
    """
    z = z.double()
    n2 = z.shape[0]
    n = n2 // 2
    ids = list(range(n)) if labels is None else [int(l) for l in labels]
    ids = ids + ids
    anchor_losses = []
    for i in range(n2):
        sims = [(z[i] * z[k]).sum() / temperature for k in range(n2)]
        denom = sum(torch.exp(sims[k]) for k in range(n2) if k != i)
        pos = [p for p in range(n2) if p != i and ids[p] == ids[i]]
        mean_log_prob = sum(torch.log(torch.exp(sims[p]) / denom) for p in pos) / len(pos)
        anchor_losses.append(-(temperature / base_temperature) * mean_log_prob)
    return sum(anchor_losses) / len(anchor_losses)


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
    with pytest.raises(ValueError, match=r"at least 2 images.*got 1"):
        SupConLoss()(F.normalize(torch.randn(2, 8), dim=1))


@pytest.mark.parametrize("labels", [[0, 1, 0], [0, 1, 0, 1, 2, 3, 4, 5], [0]])
def test_wrong_number_of_labels(labels):
    with pytest.raises(ValueError, match=rf"{len(labels)} labels for 4 images"):
        SupConLoss()(rand_z(), torch.tensor(labels))
