"""Helpers shared by the test files (fixtures are in `conftest.py`): tiny digits data and CNNs, CDS learners, callbacks
that watch a fit, float64 references of the losses, and fresh processes in which fastai_cds cannot be imported.

`pytest` puts this folder on `sys.path` (its default `prepend` import mode: `tests/` is not a package), so the test
files `from helpers import ...`."""
import os
import subprocess
import sys
import textwrap
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.transforms import IndexSplitter, ItemGetter, Normalize
from fastai.layers import ConvLayer, Flatten
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.augment import Resize
from fastai.vision.core import PILImage, PILImageBW
from fastai.vision.data import ImageBlock

from fastai_cds.benchmark import predict
from fastai_cds.cds import CDSCallback
from fastai_cds.digits import digits_items

MEAN, STD = 0.3, 0.35  # Normalize stats of the digits, per channel


# ---------------------------------------------------------------- data, models, learners
def digits_block(n_channels=1, labels=True, size=16, splitter=None):
    "A DataBlock of digits items `(image, label)` (or of the images alone), resized; Normalize as the only batch transform"
    img = ImageBlock(cls=PILImageBW if n_channels == 1 else PILImage)
    blocks, getters = ((img, CategoryBlock), [ItemGetter(0), ItemGetter(1)]) if labels else ((img,), [ItemGetter(0)])
    return DataBlock(blocks=blocks, getters=getters, n_inp=1, splitter=splitter, item_tfms=Resize(size),
                     batch_tfms=[Normalize.from_stats([MEAN] * n_channels, [STD] * n_channels, cuda=False)])


def small_dls(n_train=32, n_valid=16, size=16, n_channels=1, bs=8, labels=True, drop_last=True):
    "Digits DataLoaders: the first `n_train` digits to train, the next `n_valid` to validate; Normalize only (fast, picklable)"
    items = digits_items(n_channels)[0][:n_train + n_valid]
    db = digits_block(n_channels, labels, size, splitter=IndexSplitter(list(range(n_train, n_train + n_valid))))
    return db.dataloaders(items, bs=bs, num_workers=0, drop_last=drop_last, device='cpu')


def tiny_cnn(n_in=1, n_out=10, widths=(8, 16, 32)):
    "Three stride-2 ConvLayers (stages '0', '1', '2'), pool, linear: a plain nn.Sequential, picklable by reference"
    a, b, c = widths
    return nn.Sequential(ConvLayer(n_in, a, stride=2), ConvLayer(a, b, stride=2), ConvLayer(b, c, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(c, n_out))


def no_bar(learn):
    learn.remove_cb(ProgressCallback)
    return learn


def tiny_learner(dls=None, cds=None, loss_func=None, **kwargs):
    "A Learner of `tiny_cnn` on `dls` (default `small_dls()`) with `cds` (default `CDSCallback(verbose=False)`), no bar"
    dls = dls if dls is not None else small_dls()
    cds = cds if cds is not None else CDSCallback(verbose=False)
    return no_bar(Learner(dls, tiny_cnn(dls.one_batch()[0].shape[1]), loss_func=loss_func or CrossEntropyLossFlat(),
                          cbs=cds, **kwargs))


def manual_valid(learn):
    "Logits and targets of the plain model (`learn.model.model`), in eval mode, over the validation set"
    return predict(learn.model.model, learn.dls.valid)


# ---------------------------------------------------------------- watching a fit
class Spy(Callback):
    "Run plain functions (no arguments) at some events, at a chosen `order`"
    def __init__(self, order=0, **events):
        self.order = order
        for k, f in events.items(): object.__setattr__(self, k, f)


def stop():
    raise CancelFitException()


def snapshot(module):
    "A copy of the state_dict (parameters and buffers)"
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def param_snapshot(module):
    "A copy of the parameters, by name"
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def count_calls(modules):
    "Forward hooks counting the calls of `modules`: (a one-element counter list, the handles to remove)"
    n = [0]
    def inc(*_): n[0] += 1
    return n, [m.register_forward_hook(inc) for m in modules]


def hooked_modules(module):
    "Names of the submodules of `module` (itself included) holding a forward or forward-pre hook"
    return [n for n, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def is_bn(m):
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


# ---------------------------------------------------------------- references
def ref_supcon(z, labels, temperature=0.07, base_temperature=0.07):
    """Dense SupCon in float64, anchor by anchor: positives = other rows with the same id, denominator = all other rows.
    `labels` (N,) are the ids of the first N rows, repeated for the second N; None: each image its own id (SimCLR)"""
    z = z.double()
    n2 = z.shape[0]
    ids = (torch.arange(n2 // 2) if labels is None else torch.as_tensor(labels).reshape(-1).cpu()).tolist() * 2
    sim = z @ z.T / temperature
    total = 0.
    for i in range(n2):
        others = [k for k in range(n2) if k != i]
        log_den = torch.logsumexp(sim[i, others], 0)
        pos = [k for k in others if ids[k] == ids[i]]
        total = total - (temperature / base_temperature) * sum(sim[i, k] - log_den for k in pos) / len(pos)
    return total / n2


def ref_ce(logits, y):
    "Cross-entropy in float64 from its definition: logsumexp minus the target logit, averaged over the batch"
    logits = logits.double()
    return (logits.logsumexp(1) - logits[torch.arange(len(y)), y]).mean()


def ref_kl(student, teacher, T=1.):
    "KL(softmax(teacher/T) || softmax(student/T)) in float64, summed over classes, averaged over the batch"
    p, q = F.softmax(teacher.double() / T, 1), F.softmax(student.double() / T, 1)
    return (p * (p.log() - q.log())).sum(1).mean()


def ref_soft(s, t, T, kl):
    "Soft cross-entropy -sum p_t log p_s (reference code), or KL(p_t || p_s) x T^2 (Hinton); mean over the batch, float64"
    if kl: return ref_kl(s, t, T) * T * T
    return -(F.softmax(t.double() / T, 1) * F.log_softmax(s.double() / T, 1)).sum(1).mean()


def ref_distance(s, t, squared):
    "Reference code: the Euclidean norm of the whole (B, d) difference; paper: mean over rows of the squared distance"
    d = (t.double() - s.double())
    return (d ** 2).sum(1).mean() if squared else (d ** 2).sum().sqrt()


# ---------------------------------------------------------------- exports and fresh processes
# The start of a child script: fastai_cds blocked (`blocked`: the block held); `json`, `torch`, `load_learner`; `d` its folder
BLOCKED = textwrap.dedent("""
    import sys
    sys.modules['fastai_cds'] = None  # before anything: fastai_cds cannot be imported in this process
    import json, warnings
    warnings.filterwarnings('ignore')
    try:
        import fastai_cds
        blocked = False
    except ImportError:
        blocked = True
    import torch
    from fastai.learner import load_learner
    d = sys.argv[1]
""")


def run_children(*scripts, timeout=300):
    "Run each `(code, *args)` with `python -c` in a fresh process, all at once, one thread each; their stdouts"
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, '-c', code, *map(str, args)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for code, *args in scripts]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs): assert p.returncode == 0, err[-4000:]
    return [out for out, _ in outs]


def pickled_globals(fname):
    """Every `module.qualname` that loading `fname` imports: the GLOBAL and STACK_GLOBAL opcodes of its pickle (the
    data.pkl of a torch.save zip, or a plain pickle). What is pickled by value and plain strings such as the learner's
    path (a clone folder may be named fastai_cds) are not imports."""
    import pickletools
    if zipfile.is_zipfile(fname):
        with zipfile.ZipFile(fname) as z: blobs = [z.read(n) for n in z.namelist() if n.endswith('.pkl')]
    else: blobs = [open(fname, 'rb').read()]
    found = set()
    for blob in blobs:
        memo, pushed = {}, []  # strings pushed (directly or from the memo): STACK_GLOBAL takes the last two
        for op, arg, _ in pickletools.genops(blob):
            if op.name == 'GLOBAL': found.add(arg.replace(' ', '.'))
            elif op.name == 'STACK_GLOBAL': found.add(f'{pushed[-2]}.{pushed[-1]}')
            elif op.name in ('MEMOIZE', 'BINPUT', 'LONG_BINPUT', 'PUT'):
                memo[len(memo) if op.name == 'MEMOIZE' else arg] = pushed[-1] if pushed else None
            elif op.name in ('BINGET', 'LONG_BINGET', 'GET'): pushed.append(memo.get(arg))
            elif isinstance(arg, str) and ('UNICODE' in op.name or 'STRING' in op.name): pushed.append(arg)
    return found


def ours(fname):
    "The imports of fastai_cds that loading `fname` would need (none for a plain export)"
    return sorted(g for g in pickled_globals(fname) if g.split('.')[0] == 'fastai_cds')
