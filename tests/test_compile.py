"""`CompileCallback`: a compiled CDS learner has no graph break and no recompilation after its first steps, computes the
eager learner's losses, trains, validates and exports the plain (uncompiled) model. CI compiles with the `eager` and
`aot_eager` backends (dynamo, and dynamo + AOTAutograd: what inductor is given); inductor itself generates C++ for
minutes on a CPU, so its test is `slow` (and `bench/overhead.py` measures it)."""
import pytest
import torch
import torch._dynamo
import torchvision
from torch._dynamo.testing import CompileCounterWithBackend
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import Tensor, TensorImageBW, set_seed

from fastai_cds.compile import CompileCallback, compile_model
from fastai_cds.cds import CDSCallback
from fastai_cds.model import DeepSupervisionModel
from fastai_cds.precision import to_mixed_precision
from helpers import Spy, no_bar, ours, small_dls, snapshot, stop, tiny_cnn

pytestmark = pytest.mark.usefixtures('seeded')


@pytest.fixture(autouse=True)
def fresh_dynamo():
    "Every test compiles from scratch and reads its own counters"
    torch._dynamo.reset(); torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def cds_learner(model, dls, *cbs):
    return no_bar(Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                          cbs=[CDSCallback(view2_tfms=[], verbose=False), *cbs]))


MODELS = {'small CNN': (lambda: tiny_cnn(), dict()),
          'ResNet18': (lambda: torchvision.models.resnet18(num_classes=10), dict(n_channels=3, size=32))}


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n == 'ResNet18' else n for n in MODELS])  # ResNet18: 20 s
def test_no_graph_break_and_no_recompilation_after_the_first_steps(name):
    "fullgraph=True: a graph break is an error; over 12 training steps and two epochs, the graphs of the first steps only"
    make, kw = MODELS[name]
    counter = CompileCounterWithBackend('eager')
    learn = cds_learner(make(), small_dls(n_train=13*4, n_valid=8, bs=4, **kw), CompileCallback(backend=counter, fullgraph=True))
    frames = []
    learn.fit(2, 1e-3, cbs=Spy(after_batch=lambda: frames.append(counter.frame_count) if learn.training else None))
    assert len(frames) == 2*13 and sum(torch._dynamo.utils.counters['graph_break'].values()) == 0
    first, second = frames[:13], frames[13:]
    assert 1 <= first[1] <= 2 and set(first[1:]) == {first[1]}, frames  # graphs of the first two steps, none in the next 11
    assert set(second) == {first[1] + 1} == {counter.frame_count}, frames  # one for validation (eval, no gradients), then none


def first_step(learn):
    "The loss terms of the first training batch and the parameters after its step"
    got = {}
    learn.fit(1, 1e-2, cbs=[Spy(order=100, after_loss=lambda: got.update(loss=learn.loss.item())), Spy(after_step=stop)])
    return got, snapshot(learn.model)


def test_compiled_and_eager_agree_on_the_first_batch():
    "Same weights, same batch: the compiled learner's loss and updated weights are the eager one's"
    dls = small_dls(n_train=16, n_valid=8, bs=8)
    set_seed(1); eager = cds_learner(tiny_cnn(), dls)
    set_seed(1); compiled = cds_learner(tiny_cnn(), dls, CompileCallback(backend='aot_eager'))
    assert snapshot(eager.model).keys() == snapshot(compiled.model).keys()
    compiled.model.load_state_dict(eager.model.state_dict())
    (a, wa), (b, wb) = [(set_seed(2), first_step(l))[1] for l in (eager, compiled)]
    assert compiled.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    assert abs(a['loss'] - b['loss']) < 1e-5, (a, b)
    for k in wa: torch.testing.assert_close(wa[k], wb[k], msg=k, rtol=1e-4, atol=1e-5)


def check_trains_validates_exports(learn, tmp_path):
    dls = learn.dls
    learn.fit(3, 1e-2)
    losses = [v[0] for v in learn.recorder.values]
    assert losses[-1] < losses[0], losses  # the training loss goes down
    assert isinstance(learn.model, DeepSupervisionModel) and learn.model._compiled_call_impl is not None
    valid_loss, acc = learn.validate()
    learn.export(tmp_path/'m.pkl')
    assert learn.model._compiled_call_impl is not None  # given back after the export
    assert ours(tmp_path/'m.pkl') == []
    plain = load_learner(tmp_path/'m.pkl')
    assert getattr(plain.model, '_compiled_call_impl', None) is None and not hasattr(plain.model, 'heads')
    assert list(plain.model.state_dict()) == list(tiny_cnn().state_dict())
    x = dls.valid.one_batch()[0]  # a fastai TensorImageBW: the compiled model takes it as a plain tensor
    plain.model.eval(); learn.model.eval()
    with torch.no_grad(): torch.testing.assert_close(plain.model(x).as_subclass(Tensor), learn.model(x), rtol=1e-4, atol=1e-4)
    _, preds_acc = plain.validate(dl=dls.valid)
    assert abs(preds_acc - acc) < 1e-6


def test_compiled_learner_trains_validates_and_exports_the_plain_model(tmp_path):
    check_trains_validates_exports(cds_learner(tiny_cnn(), small_dls(n_train=64, n_valid=16, bs=16),
                                               CompileCallback(backend='aot_eager')), tmp_path)


@pytest.mark.slow
def test_with_inductor(tmp_path):
    "The default backend (C++ kernels on a CPU: minutes to compile)"
    check_trains_validates_exports(cds_learner(tiny_cnn(), small_dls(n_train=64, n_valid=16, bs=16), CompileCallback()), tmp_path)


def test_compiled_with_mixed_precision():
    "bf16 autocast around the compiled forward: the heads run in bf16, the contrastive loss in fp32"
    learn = to_mixed_precision(cds_learner(tiny_cnn(), small_dls(n_train=16, n_valid=8, bs=8), CompileCallback(backend='aot_eager')))
    seen = {}
    learn.fit(1, 1e-3, cbs=[Spy(order=5, after_pred=lambda: seen.update(head=learn.cds.taps.heads[0].dtype)),
                            Spy(order=100, after_loss=lambda: seen.update(loss=learn.loss_grad.dtype, finite=bool(learn.loss_grad.isfinite()))),
                            Spy(after_step=stop)])
    assert seen == dict(head=torch.bfloat16, loss=torch.float32, finite=True)


def test_compile_model_takes_fastai_tensors_and_keeps_the_module():
    m = tiny_cnn().eval()
    x = TensorImageBW(torch.randn(4, 1, 16, 16))
    with torch.no_grad(): want = m(x.as_subclass(Tensor))
    assert compile_model(m, backend='aot_eager') is m and list(m.state_dict()) == list(tiny_cnn().state_dict())
    with torch.no_grad(): torch.testing.assert_close(m(x), want)


def test_armed_forward_outside_training_compiled():
    "arm / forward / read by hand (no training epoch registered the hooks): the compiled model gives the eager taps"
    dls = small_dls(n_train=16, n_valid=8, bs=8)
    set_seed(1); eager = cds_learner(tiny_cnn(), dls)
    set_seed(1); compiled = cds_learner(tiny_cnn(), dls)
    compiled.model.load_state_dict(eager.model.state_dict())
    compile_model(compiled.model, backend='aot_eager')
    x = torch.randn(8, 1, 16, 16)
    taps = []
    for l in (eager, compiled):
        l.model.train(); l.model.arm(x[4:]); out = l.model(x[:4]); taps.append((out, l.model.read()))
        assert not any(m._forward_hooks for m in l.model.modules())  # the hooks are gone after the call
    (oa, ta), (ob, tb) = taps
    torch.testing.assert_close(ob, oa, rtol=1e-4, atol=1e-5)
    for a, b in zip(ta.heads, tb.heads): torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
