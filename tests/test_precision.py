"""Tests of `fastai_cds.precision`: `DeviceMixedPrecision` / `to_mixed_precision` autocast in bfloat16 on the
DataLoaders' device (a CPU here, where fastai's `to_fp16`/`to_bf16` autocast CUDA only), with and without CDS."""
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat

from fastai_cds.cds import CDSCallback
from fastai_cds.precision import DeviceMixedPrecision, to_mixed_precision

from helpers import Spy, no_bar, ours, small_dls, stop, tiny_cnn

pytestmark = pytest.mark.usefixtures('seeded')  # set_seed(0) before every test (conftest.py)


def test_device_mixed_precision_on_a_plain_learner():
    "bf16 forward on the CPU, pred back in fp32 for the loss, no loss scaling; nothing left after the fit"
    learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=DeviceMixedPrecision()))
    mp = learn.device_mixed_precision
    seen = {}
    def at_pred(): seen.update(raw=learn.pred.dtype, autocast=torch.is_autocast_enabled('cpu'))
    def at_loss(): seen.update(pred=learn.pred.dtype, pred_v=learn.pred.detach().clone(), y=learn.y.clone(),
                               loss=learn.loss_grad.detach().clone(), scaler=learn.scaler.is_enabled())
    learn.fit(1, cbs=[Spy(5, after_pred=at_pred), Spy(100, after_loss=at_loss, after_batch=stop)])
    assert seen['raw'] == torch.bfloat16 and seen['autocast']  # before MixedPrecision's after_pred (order 10)
    assert seen['pred'] == torch.float32 and seen['loss'].dtype == torch.float32 and not seen['scaler']
    torch.testing.assert_close(seen['loss'], F.cross_entropy(seen['pred_v'], seen['y'].as_subclass(torch.Tensor)))
    assert not torch.is_autocast_enabled('cpu') and mp.autocast is None  # exited, and forgotten after the fit


def test_to_mixed_precision_on_cpu_bf16_forward_fp32_losses_dropped_at_export(tmp_path):
    "fastai's to_fp16/to_bf16 autocast on CUDA only; ours autocasts on the DataLoaders' device and leaves the export"
    learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)))
    assert to_mixed_precision(learn) is learn
    assert sum(isinstance(cb, DeviceMixedPrecision) for cb in learn.cbs) == 1
    seen = []
    learn.add_cb(Spy(5, after_pred=lambda: learn.training and seen.append((learn.pred.dtype, [z.dtype for z in learn.cds.taps.heads])),
                     after_loss=lambda: learn.training and seen.append((learn.loss_grad.dtype, [t.dtype for t in learn.cds.terms.values()]))))
    learn.fit(1)
    assert seen[0] == (torch.bfloat16, [torch.bfloat16] * len(learn.model.heads))  # forward and heads in bf16
    assert seen[1][0] == torch.float32 and set(seen[1][1]) == {torch.float32}  # CE and contrastive terms in fp32
    assert torch.isfinite(learn.recorder.losses[-1])
    learn.export(tmp_path/'m.pkl')
    assert ours(tmp_path/'m.pkl') == []
    assert not any(isinstance(cb, MixedPrecision) for cb in load_learner(tmp_path/'m.pkl').cbs)
    assert sum(isinstance(cb, DeviceMixedPrecision) for cb in learn.cbs) == 1  # still on the training learner
