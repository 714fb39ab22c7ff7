"Tests of `fastai_cds.metrics`: ECE against hand computations, the fastai Metric against the function, reliability plots, the best epoch."
import math

import matplotlib
matplotlib.use("Agg")
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed

from fastai_cds.baselines import DSNCallback
from fastai_cds.digits import digits_dls
from fastai_cds.architectures import small_cnn
from fastai_cds.metrics import BestMetrics, ExpectedCalibrationError, calibration_bins, ece, plot_reliability

from helpers import no_bar, tiny_cnn


def ref_ece(probs, targets, n_bins):
    "Item by item, in float64: the bin of confidence c is the k with k/n < c <= (k+1)/n"
    probs = probs.double()
    bins = {}
    for p, t in zip(probs, targets.tolist()):
        c, pred = p.max().item(), p.argmax().item()
        k = min(n_bins - 1, max(0, math.ceil(c * n_bins) - 1))
        bins.setdefault(k, []).append((c, float(pred == t)))
    n = len(targets)
    return sum(len(v) / n * abs(sum(a for _, a in v) / len(v) - sum(c for c, _ in v) / len(v)) for v in bins.values())


# ---------------------------------------------------------------- 1. the function
def test_ece_tiny_hand_example():
    # 5 bins of width 0.2. Confidences 0.95 (right), 0.7 (wrong), 0.7 (right), 0.35 (right, 3 classes)
    probs = torch.tensor([[0.95, 0.05, 0.], [0.1, 0.7, 0.2], [0.7, 0.2, 0.1], [0.35, 0.33, 0.32]])
    targets = torch.tensor([0, 0, 0, 0])
    # bin (0.8,1]: acc 1, conf 0.95 -> 0.05; bin (0.6,0.8]: acc 0.5, conf 0.7 -> 0.2; bin (0.2,0.4]: acc 1, conf 0.35 -> 0.65
    expected = 1 / 4 * 0.05 + 2 / 4 * 0.2 + 1 / 4 * 0.65
    assert abs(ece(probs, targets, n_bins=5) - expected) < 1e-6
    # one bin: |overall accuracy - mean confidence|
    assert abs(ece(probs, targets, n_bins=1) - abs(3 / 4 - (0.95 + 0.7 + 0.7 + 0.35) / 4)) < 1e-6
    count, acc, conf = calibration_bins(probs, targets, 5)
    assert count.tolist() == [0, 1, 0, 2, 1]
    torch.testing.assert_close(acc, torch.tensor([0., 1., 0., 0.5, 1.]))
    torch.testing.assert_close(conf, torch.tensor([0., 0.35, 0., 0.7, 0.95]))


@pytest.mark.parametrize("n_bins", [1, 3, 10, 15, 40])
def test_ece_matches_itemwise_reference(n_bins):
    g = torch.Generator().manual_seed(n_bins)
    probs = F.softmax(torch.randn(300, 7, generator=g) * 2, 1)
    targets = torch.randint(0, 7, (300,), generator=g)
    got = ece(probs, targets, n_bins)
    assert 0 <= got <= 1
    assert abs(got - ref_ece(probs, targets, n_bins)) < 1e-5


def test_ece_extremes_and_bad_input():
    assert ece(torch.eye(4), torch.arange(4)) == 0.
    assert abs(ece(torch.eye(4), torch.tensor([1, 2, 3, 0])) - 1.) < 1e-6
    assert math.isnan(ece(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="n_bins must be >= 1"): ece(torch.eye(2), torch.arange(2), n_bins=0)
    with pytest.raises(ValueError, match="n_bins must be >= 1"): ExpectedCalibrationError(n_bins=0)
    with pytest.raises(ValueError, match=r"\(n, n_classes\)"): ece(torch.rand(4), torch.arange(4))
    with pytest.raises(ValueError, match=r"\(n, n_classes\)"): ece(torch.rand(4, 2), torch.arange(3))


# ---------------------------------------------------------------- 2. the Metric in a Learner
@pytest.fixture(scope="module")
def trained():
    set_seed(0)
    dls = digits_dls(size=16, label_fraction=0.3, bs=16, device="cpu")
    metric = ExpectedCalibrationError()
    learn = no_bar(Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), metrics=[accuracy, metric],
                           cbs=DSNCallback(verbose=False)))
    learn.fit(2, 1e-2)
    return learn, metric


def test_metric_equals_function_on_the_same_predictions(trained):
    learn, metric = trained
    assert list(learn.recorder.metric_names)[:5] == ["epoch", "train_loss", "valid_loss", "accuracy", "ece"]
    recorded = learn.recorder.values[-1][3]  # train_loss, valid_loss, accuracy, ece
    # independent predictions: the plain model in eval mode over the validation set, softmax
    m = learn.model.model.eval()
    with torch.no_grad():
        probs = torch.cat([F.softmax(m(xb).as_subclass(torch.Tensor), 1) for xb, _ in learn.dls.valid])
    ys = torch.cat([yb.as_subclass(torch.Tensor) for _, yb in learn.dls.valid])
    assert len(learn.dls.valid) > 1  # accumulated over several batches
    expected = ref_ece(probs, ys, 15)
    assert abs(recorded - expected) < 1e-5
    assert abs(metric.value - ece(probs, ys)) < 1e-6
    assert 0 < recorded < 1
    # validate() recomputes it the same way
    assert abs(learn.validate()[2] - expected) < 1e-5


def test_metric_uses_the_loss_activation_or_the_one_given(trained):
    "Called on raw logits through fastai's Metric protocol: softmax by default, a custom activation when given"
    learn, _ = trained
    class FakeLearn:
        def __init__(self, pred, y, loss_func): self.pred, self.y, self.loss_func = pred, y, loss_func
        def to_detach(self, x): return x.detach()
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(40, 5, generator=g) * 2, torch.randint(0, 5, (40,), generator=g)
    for lf in (CrossEntropyLossFlat(), nn.CrossEntropyLoss(), LabelSmoothingCrossEntropyFlat()):
        m = ExpectedCalibrationError(n_bins=7)
        m.reset()
        m.accumulate(FakeLearn(logits[:25], y[:25], lf)); m.accumulate(FakeLearn(logits[25:], y[25:], lf))
        assert abs(m.value - ref_ece(F.softmax(logits, 1), y, 7)) < 1e-6
    sharpen = lambda x: F.softmax(2 * x, dim=-1)
    m = ExpectedCalibrationError(n_bins=7, activation=sharpen)
    m.reset(); m.accumulate(FakeLearn(logits, y, CrossEntropyLossFlat()))
    assert abs(m.value - ref_ece(F.softmax(2 * logits, 1), y, 7)) < 1e-6
    assert ExpectedCalibrationError().value is None  # nothing accumulated


# ---------------------------------------------------------------- 3. reliability diagram
def test_plot_reliability_from_learner_and_from_preds(trained):
    learn, _ = trained
    probs, ys = learn.get_preds()
    ax = plot_reliability(learn, n_bins=10)
    assert ax.get_title() == f"ECE {ref_ece(probs, ys, 10) * 100:.2f}%"
    # the accuracy bars: one per non-empty bin, centred on it, as high as the bin's accuracy
    conf, pred = probs.max(1)
    expected = {}
    for c, ok in zip(conf.tolist(), (pred == ys).tolist()):
        k = min(9, max(0, math.ceil(c * 10) - 1))
        expected.setdefault(k, []).append(ok)
    acc_bars = ax.containers[0]
    assert len(acc_bars) == len(expected)
    for bar, k in zip(acc_bars, sorted(expected)):
        assert abs(bar.get_x() + bar.get_width() / 2 - (k + 0.5) / 10) < 1e-6
        assert abs(bar.get_height() - sum(expected[k]) / len(expected[k])) < 1e-6
    # the diagonal is drawn
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == [0, 1]
    ax2 = plot_reliability((probs, ys), n_bins=10, title="mine")
    assert ax2.get_title() == "mine" and len(ax2.containers[0]) == len(expected)


def test_best_metrics_picks_the_best_epoch():
    "The highest validation accuracy over the epochs, the first epoch it came in, every metric then; a later get_preds leaves them"
    learn = Learner(digits_dls(size=8, label_fraction=0.1), small_cnn(width=4), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    cbs=BestMetrics())
    with learn.no_bar(), learn.no_logging(): learn.fit(5, 1e-2)
    values = [list(v) for v in learn.recorder.values]  # train_loss, valid_loss, accuracy of each epoch
    accs = [v[2] for v in values]
    with learn.no_bar(): learn.get_preds()  # it calls before_fit (the Recorder starts anew), not the fit's best
    bm = learn.best_metrics
    assert bm.best == max(accs) and bm.best_at == accs.index(max(accs))
    assert bm.best_values == dict(zip(['train_loss', 'valid_loss', 'accuracy'], values[bm.best_at]))
