"""What the paired-seed benchmarks (compare.py, distill.py, semisup.py) share: seeding, training and evaluating a run,
their JSON-lines results, and the statistics and cells of their markdown tables.

The benchmarks run as `python bench/<name>.py` from the repository root, which puts `bench/` first on `sys.path`, so
they import this module as `paired`. Not run by CI.
"""
import json, math, random, time
from pathlib import Path
import numpy as np
import torch
from torch import nn
from fastai.torch_core import set_seed
from fastai.callback.core import Callback, CancelValidException
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai_cds.digits import digits_stats
from fastai_cds.metrics import ece
from fastai_cds.views import reference_views, simclr_tfms

__all__ = ['VIEWS', 'digits_views', 'reseed', 'SkipValidation', 'fit', 'predict', 'evaluate', 'evaluate_calibrated', 'load_rows',
           'append_row', 'complete', 't_interval', 'sd', 'mean_std', 'delta_cells']

# The views of a run

VIEWS = ('reference', 'default')

def digits_views(views:str, size:int)->tuple[list|None, list]:
    """(batch transforms of the DataLoaders, view-2 transforms of CDS) on the digits. 'reference': the digits variant of the
    reference CIFAR views (`reference_views('cifar', size, n_channels=1, flip=False)`: pad-and-crop, Cutout, the grouped
    jitter; no flip, the digits are not mirror images); 'default': `digits_dls`' own augmentation (None) and `simclr_tfms`"""
    if views == 'reference':
        v = reference_views('cifar', size, n_channels=1, flip=False, stats=digits_stats())
        return v.batch_tfms, v.view2_tfms
    if views == 'default': return None, simclr_tfms(n_channels=1, flip=False)
    raise ValueError(f"views must be one of {VIEWS}, got {views!r}")

# Running a seed

def reseed(seed:int, dls:DataLoaders):
    "Seed everything, the training loader's shuffling too (fastai draws its RNG once, when the loader is made)"
    set_seed(seed, reproducible=True)
    dls.train.rng = random.Random(seed)

class SkipValidation(Callback):
    "No validation during training: the benchmark evaluates once at the end"
    def before_validate(self): raise CancelValidException()

def fit(learn:Learner, epochs:int, lr:float)->float:
    "Train with one-cycle; seconds taken"
    start = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return time.time() - start

def predict(model:nn.Module, dl)->tuple[torch.Tensor, torch.Tensor]:
    "Logits (float) and targets of `model` (eval mode) on `dl`"
    model.eval()
    with torch.no_grad():
        logits, ys = zip(*[(model(xb).as_subclass(torch.Tensor).float(), yb.as_subclass(torch.Tensor)) for xb,yb in dl])
    return torch.cat(logits), torch.cat(ys)

def evaluate(model:nn.Module, dl)->float:
    "Accuracy of `model` (eval mode) on `dl`"
    logits, ys = predict(model, dl)
    return float((logits.argmax(1) == ys).float().mean())

def evaluate_calibrated(model:nn.Module, dl)->tuple[float, float]:
    "Accuracy and ECE of `model` (eval mode) on `dl`"
    logits, ys = predict(model, dl)
    probs = torch.softmax(logits, 1)
    return float((probs.argmax(1) == ys).float().mean()), ece(probs, ys)

# Results, one JSON line per run

def load_rows(path:Path)->list[dict]:
    "The runs recorded in `path` (none if it does not exist yet)"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

def append_row(path:Path, r:dict):
    "Record run `r` at the end of `path`, at once: an interrupted benchmark loses only the runs in flight"
    with path.open('a') as f: f.write(json.dumps(r) + '\n')

# Paired statistics and table cells

def complete(rows:list[dict], label_fraction:float, seeds:list[int], methods:list[str])->tuple[dict, list[int]]:
    "Runs of one label fraction by (method, seed), and the seeds every one of `methods` finished"
    by = {(r['method'], r['seed']): r for r in rows if r['label_fraction'] == label_fraction}
    return by, [s for s in seeds if all((m, s) in by for m in methods)]

def t_interval(d:np.ndarray)->tuple[float, float]:
    "Mean of the paired differences `d` and the half-width of its 95% t-interval"
    from scipy.stats import t
    n = len(d)
    if n < 2: return float(d.mean()), float('nan')
    return float(d.mean()), float(t.ppf(0.975, n-1) * d.std(ddof=1) / math.sqrt(n))

def sd(a:np.ndarray)->float:
    "Sample standard deviation of `a` (nan for a single value)"
    return a.std(ddof=1) if len(a) > 1 else float('nan')

def mean_std(a:np.ndarray)->str:
    "`a` (fractions) as 'mean ± std' in percent"
    return f"{a.mean()*100:.2f} ± {sd(a)*100:.2f}"

def delta_cells(acc:np.ndarray, base:np.ndarray)->tuple[str, str]:
    "Mean difference of `acc` to the paired `base` in points with its 95% t-interval, and wins/ties/losses"
    d = (acc - base)*100
    mu, hw = t_interval(d)
    return f"{mu:+.2f} [{mu-hw:+.2f}, {mu+hw:+.2f}]", f"{(d > 1e-9).sum()}/{(abs(d) <= 1e-9).sum()}/{(d < -1e-9).sum()}"
