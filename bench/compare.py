"""Accuracy and calibration of baseline, DSN, DKS, DHM and CDS (SupCon, SimCLR) on the embedded digits, paired seeds.

Every method trains the same CNN (`fastai_cds.architectures.small_cnn`, the quick start's) with the same schedule; a seed fixes the data
split, the labelled subset, the shuffling order and the initialisation of the shared network for every method, so the
differences to the baseline are paired. Results go one JSON line per run to `bench/out/compare.jsonl` as they finish;
a run already there (same configuration) is skipped, so an interrupted benchmark resumes where it stopped. Not run by CI.

Deviations from the paper: digits at 16x16 instead of CIFAR/ImageNet, a 4-stage CNN, Adam with one-cycle over few
epochs instead of SGD over 300 epochs; view 2 of CDS without flip (digits are not mirror-symmetric). Each run uses one
intra-op thread (`--threads`) and runs go two at a time (`--workers`): on a shared 2-core machine that is several times
faster than one run on two threads.
"""
import os, time, warnings
from pathlib import Path
import numpy as np
import torch
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from paired import VIEWS, digits_views, SkipValidation, fit, evaluate_calibrated, load_rows, append_row, complete, mean_std, delta_cells

METHODS = ['baseline', 'DSN', 'DKS', 'DHM', 'CDS-SupCon', 'CDS-SimCLR']

def make_cbs(method:str, v2:list)->list:
    "The deep-supervision callback of `method`, with the library's defaults; `v2`: CDS's view 2"
    return {'baseline': [], 'DSN': [DSNCallback(verbose=False)], 'DKS': [DKSCallback(verbose=False)],
            'DHM': [DHMCallback(verbose=False)],
            'CDS-SupCon': [CDSCallback(view2_tfms=v2, verbose=False)],
            'CDS-SimCLR': [CDSCallback(supervised=False, view2_tfms=v2, verbose=False)]}[method]

def run(method:str, seed:int, label_fraction:float, epochs:int, size:int, lr:float, bs:int, views:str='reference')->dict:
    "Train one model; its accuracy, ECE and time"
    set_seed(seed, reproducible=True)  # fastai's DataLoader draws its shuffling generator when it is made
    batch_tfms, v2 = digits_views(views, size)
    dls = digits_dls(size=size, label_fraction=label_fraction, seed=seed, bs=bs, device='cpu', batch_tfms=batch_tfms)
    set_seed(seed, reproducible=True)
    model = small_cnn()  # same initial weights for every method of this seed
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[SkipValidation(), *make_cbs(method, v2)])
    secs = fit(learn, epochs, lr)
    acc, e = evaluate_calibrated(model, dls.valid)
    return dict(acc=acc, ece=e, secs=secs, n_train=len(dls.train_ds), n_valid=len(dls.valid_ds))

def _job(args:tuple)->tuple[dict, dict]:
    "One run in a worker process: (configuration, result)"
    c, threads = args
    warnings.filterwarnings('ignore')
    torch.set_num_threads(threads)
    return c, run(c['method'], c['seed'], c['label_fraction'], c['epochs'], c['size'], c['lr'], c['bs'], c['views'])

def table(rows:list[dict], label_fraction:float, seeds:list[int])->str:
    "Markdown table of one label fraction over the seeds that every method finished"
    by, done = complete(rows, label_fraction, seeds, METHODS)
    if not done: return f"(no complete seed at {label_fraction:.0%} labels yet)"
    r0 = by[('baseline', done[0])]
    out = [f"digits {r0['size']}x{r0['size']}, {label_fraction:.0%} of the training labels ({r0['n_train']} images), "
           f"{r0['epochs']} epoch{'s' if r0['epochs'] > 1 else ''}, {len(done)} paired seeds, {r0['n_valid']} validation images",
           "", "| method | accuracy % (mean ± std) | Δ vs baseline, points (95% CI) | wins/ties/losses | ECE % (mean ± std) | s/run |",
           "|---|---|---|---|---|---|"]
    base = np.array([by[('baseline', s)]['acc'] for s in done])
    for m in METHODS:
        acc = np.array([by[(m, s)]['acc'] for s in done]); e = np.array([by[(m, s)]['ece'] for s in done])
        secs = np.mean([by[(m, s)]['secs'] for s in done])
        diff, wtl = ('—', '—') if m == 'baseline' else delta_cells(acc, base)
        out.append(f"| {m} | {mean_std(acc)} | {diff} | {wtl} | {mean_std(e)} | {secs:.1f} |")
    return '\n'.join(out)

@call_parse
def main(
    seeds:int=10, # paired seeds (each fixes split, labelled subset and initialisation for every method)
    first_seed:int=0, # seeds first_seed .. first_seed+seeds-1
    fractions:str='0.1,1.0', # label fractions, comma-separated
    epochs_low:int=10, # epochs at label fractions below 0.5 (few batches per epoch)
    epochs_high:int=1, # epochs at label fractions of 0.5 and more
    size:int=16, # image size
    lr:float=3e-3, # one-cycle maximum learning rate (Adam)
    bs:int=32, # batch size
    views:str='reference', # reference: the digits variant of the reference CIFAR views; default: digits_dls' augmentation and simclr_tfms
    methods:str='', # comma-separated subset of the methods (default: all)
    threads:int=1, # torch intra-op threads per run
    workers:int=2, # runs in parallel (processes)
    out:str='bench/out/compare.jsonl', # results, one JSON line per run; runs already there are skipped
    report_only:bool=False, # only print the tables of what `out` holds
):
    "Train every method on every seed and label fraction; print markdown tables"
    warnings.filterwarnings('ignore')
    torch.set_num_threads(threads)
    global METHODS
    if methods: METHODS = [m for m in METHODS if m in methods.split(',')]
    fracs, seed_list = [float(f) for f in fractions.split(',')], list(range(first_seed, first_seed+seeds))
    path = Path(out); path.parent.mkdir(parents=True, exist_ok=True)
    rows = load_rows(path)
    cfg = lambda lf: dict(label_fraction=lf, epochs=epochs_low if lf < 0.5 else epochs_high, size=size, lr=lr, bs=bs, views=views)
    key = lambda r: (r['method'], r['seed'], r['label_fraction'], r['epochs'], r['size'], r['lr'], r['bs'], r.get('views', 'default'))
    have = {key(r) for r in rows}
    todo = [dict(method=m, seed=seed, **cfg(lf)) for seed in seed_list for lf in fracs for m in METHODS]  # seed-major
    todo = [c for c in todo if key(c) not in have]
    start = time.time()
    if todo and not report_only:
        import multiprocessing as mp
        pool = mp.get_context('spawn').Pool(workers) if workers > 1 else None
        results = pool.imap_unordered(_job, [(c, threads) for c in todo]) if pool else map(_job, [(c, threads) for c in todo])
        for c, res in results:  # written as they finish
            r = {**c, **res, 'threads': threads, 'workers': workers}
            rows.append(r); have.add(key(r)); append_row(path, r)
            print(f"seed {r['seed']} {r['label_fraction']:.0%} {r['method']:<11} acc {r['acc']*100:6.2f}%  ECE {r['ece']*100:5.2f}%  "
                  f"{r['secs']:5.1f}s  (total {time.time()-start:6.0f}s)", flush=True)
        if pool: pool.close(); pool.join()
    sel = [r for r in rows if key(r) == key(dict(method=r['method'], seed=r['seed'], **cfg(r['label_fraction'])))]
    w, th = sorted({r.get('workers', 1) for r in sel}), sorted({r.get('threads', 1) for r in sel})
    print(f"\nmachine: {os.cpu_count()} CPU cores shared with other work, {w} worker process(es) x {th} torch thread(s), "
          f"torch {torch.__version__}; s/run is wall time under that load\n")
    for lf in fracs: print(table(sel, lf, seed_list) + '\n')
