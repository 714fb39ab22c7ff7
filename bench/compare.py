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
import os, warnings
import torch
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.benchmark import digits_views, SkipValidation, timed_fit, evaluate_calibrated, RunLog, Paired, markdown_table

METHODS = ['baseline', 'DSN', 'DKS', 'DHM', 'CDS-SupCon', 'CDS-SimCLR']
KEY = ['method', 'seed', 'label_fraction', 'epochs', 'size', 'lr', 'bs', 'views']  # what identifies a run (a row without views: 'default')

def make_cbs(method:str, v2:list)->list:
    "The deep-supervision callback of `method`, with the library's defaults; `v2`: CDS's view 2"
    return {'baseline': [], 'DSN': [DSNCallback(verbose=False)], 'DKS': [DKSCallback(verbose=False)],
            'DHM': [DHMCallback(verbose=False)],
            'CDS-SupCon': [CDSCallback(view2_tfms=v2, verbose=False)],
            'CDS-SimCLR': [CDSCallback(supervised=False, view2_tfms=v2, verbose=False)]}[method]

def run(method:str, seed:int, label_fraction:float, epochs:int, size:int, lr:float, bs:int, views:str='reference', **_)->dict:
    "Train one model; its accuracy, ECE and time"
    set_seed(seed, reproducible=True)  # fastai's DataLoader draws its shuffling generator when it is made
    batch_tfms, v2 = digits_views(views, size)
    dls = digits_dls(size=size, label_fraction=label_fraction, seed=seed, bs=bs, device='cpu', batch_tfms=batch_tfms)
    set_seed(seed, reproducible=True)
    model = small_cnn()  # same initial weights for every method of this seed
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[SkipValidation(), *make_cbs(method, v2)])
    secs = timed_fit(learn, epochs, lr)
    acc, e = evaluate_calibrated(model, dls.valid)
    return dict(acc=acc, ece=e, secs=secs, n_train=len(dls.train_ds), n_valid=len(dls.valid_ds))

def table(rows:list[dict], label_fraction:float, seeds:list[int], methods:list[str])->str:
    "Markdown table of one label fraction over the seeds that every method finished"
    p = Paired(rows, methods, seeds, 'baseline', label_fraction=label_fraction)
    if not p.seeds: return f"(no complete seed at {label_fraction:.0%} labels yet)"
    r0 = p.first('baseline')
    return (f"digits {r0['size']}x{r0['size']}, {label_fraction:.0%} of the training labels ({r0['n_train']} images), "
            f"{r0['epochs']} epoch{'s' if r0['epochs'] > 1 else ''}, {len(p.seeds)} paired seeds, {r0['n_valid']} validation images\n\n" +
            markdown_table(['method', 'accuracy % (mean ± std)', 'Δ vs baseline, points (95% CI)', 'wins/ties/losses',
                            'ECE % (mean ± std)', 's/run'],
                           [[m, p.mean_std(m), *p.delta(m), p.mean_std(m, 'ece'), f"{p.mean(m, 'secs'):.1f}"] for m in methods]))

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
    ms = [m for m in METHODS if not methods or m in methods.split(',')]
    fracs, seed_list = [float(f) for f in fractions.split(',')], list(range(first_seed, first_seed+seeds))
    configs = [dict(method=m, seed=s, label_fraction=lf, epochs=epochs_low if lf < 0.5 else epochs_high, size=size, lr=lr, bs=bs,
                    views=views) for s in seed_list for lf in fracs for m in ms]  # seed-major: an interrupted run leaves complete seeds
    log = RunLog(out, KEY)
    if not report_only: log.run(configs, run, workers, threads)
    sel = log.select(configs)
    w, th = sorted({r.get('workers', 1) for r in sel}), sorted({r.get('threads', 1) for r in sel})
    print(f"\nmachine: {os.cpu_count()} CPU cores shared with other work, {w} worker process(es) x {th} torch thread(s), "
          f"torch {torch.__version__}; s/run is wall time under that load\n")
    for lf in fracs: print(table(sel, lf, seed_list, ms) + '\n')
