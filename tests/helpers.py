"""Helpers shared by the test files (fixtures are in `conftest.py`): tiny digits data and CNNs, callbacks that watch a
fit, float64 references, and fresh processes in which fastai_cds cannot be imported.

`pytest` puts this folder on `sys.path` (its default `prepend` import mode: `tests/` is not a package), so the test
files `from helpers import ...`; a script that loads a test file by path must insert the folder itself."""
import os
import subprocess
import sys
import textwrap
import zipfile

import torch
import torch.nn as nn
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.transforms import IndexSplitter, ItemGetter, Normalize
from fastai.layers import ConvLayer, Flatten
from fastai.vision.augment import Resize
from fastai.vision.core import PILImage, PILImageBW
from fastai.vision.data import ImageBlock

from fastai_cds.data import digits_items

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


# ---------------------------------------------------------------- watching a fit
class Spy(Callback):
    "Run plain functions (no arguments) at some events, at a chosen `order`"
    def __init__(self, order=0, **events):
        self.order = order
        for k, f in events.items(): object.__setattr__(self, k, f)


def stop():
    raise CancelFitException()


class CPUAutocast(Callback):
    "bf16 autocast around forward and loss on CPU: fastai's `to_bf16` (MixedPrecision) uses autocast('cuda'), a no-op here"
    order = 10
    def before_batch(self):
        self.ctx = torch.autocast('cpu', dtype=torch.bfloat16)
        self.ctx.__enter__()
    def after_loss(self): self.ctx.__exit__(None, None, None)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


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


def scan_pickle(fname):
    "Every byte of the file and of every zip member (torch.save writes a zip of uncompressed records)"
    raw = open(fname, 'rb').read()
    with zipfile.ZipFile(fname) as z: members = b''.join(z.read(n) for n in z.namelist())
    return raw, members
