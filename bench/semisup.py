"""Semi-supervised CDS on the embedded digits at 10-40 % labels: the paper's Fig. 2 in miniature.

Three ways to train the quickstart's small CNN (`fastai_cds.architectures.small_cnn`) on a stratified labelled fraction:
the baseline on the labelled part, CDS on the labelled part, and semi-supervised CDS (`CDSCallback(unlabelled=udl)`:
the labelled part plus the unlabelled rest through the contrastive term only, unlabelled batch size = labelled one).
A seed fixes the data split, the labelled subset and the initialisation for every method, so the differences to the
baseline are paired. An epoch is one pass over the labelled part; every method trains the same number of steps at a
given fraction. Results go one JSON line per run to `bench/out/semisup.jsonl` as they finish; runs already there are
skipped, so an interrupted benchmark resumes. Writes the plot to `bench/out/semisup.png` (the docs' copy: docs/pages/semisup.png). Not run by CI.

Deviations from the paper: digits at 16x16 instead of CIFAR-10/100, a 4-stage CNN instead of a ResNet18, Adam with
one-cycle and few epochs instead of SGD over 300 epochs; view 2 without flip (digits are not mirror-symmetric).
"""
import math, sys, time, warnings
from pathlib import Path
import torch
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.benchmark import digits_views, reseed, SkipValidation, timed_fit, evaluate, RunLog, Paired, markdown_table

METHODS = ['baseline', 'CDS', 'semi-CDS']
LABELS = {'baseline': 'baseline (labelled part)', 'CDS': 'CDS (labelled part)', 'semi-CDS': 'semi-supervised CDS (+ unlabelled rest)'}
KEY = ['method', 'seed', 'label_fraction', 'epochs', 'size', 'lr', 'bs', 'weight', 'views']  # what identifies a run (missing: 'default')

def run(method:str, seed:int, label_fraction:float, epochs:int, size:int, lr:float, bs:int, weight:float, views:str='reference', **_)->dict:
    "Train one model; its accuracy and time"
    batch_tfms, v2 = digits_views(views, size)
    dls, udl = digits_dls(size=size, label_fraction=label_fraction, seed=seed, bs=bs, device='cpu', unlabelled=True, batch_tfms=batch_tfms)
    cbs = {'baseline': [], 'CDS': [CDSCallback(weight=weight, view2_tfms=v2, verbose=False)],
           'semi-CDS': [CDSCallback(weight=weight, view2_tfms=v2, unlabelled=udl, verbose=False)]}[method]
    reseed(seed, dls)
    model = small_cnn()  # same initial weights for every method of this seed
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[SkipValidation(), *cbs])
    secs = timed_fit(learn, epochs, lr)
    return dict(acc=evaluate(model, dls.valid), secs=secs, n_train=len(dls.train_ds), n_unlabelled=len(udl.dataset),
                n_valid=len(dls.valid_ds), steps=epochs*len(dls.train))

def table(rows:list[dict], fracs:list[float], seeds:list[int])->str:
    "One markdown table over the label fractions, each over the seeds that every method finished there"
    cells = []
    for lf in fracs:
        p = Paired(rows, METHODS, seeds, 'baseline', label_fraction=lf)
        if not p.seeds: cells.append([f"{lf:.0%}", '(no complete seed yet)', '', '', '', '', '']); continue
        r0 = p.first('baseline')
        labels = f"{lf:.0%} ({r0['n_train']} labelled, {r0['epochs']} ep, {len(p.seeds)} seeds)"
        cells += [[labels, m, p.mean_std(m), *p.delta(m), p.first(m)['steps'], f"{p.mean(m, 'secs'):.1f}"] for m in METHODS]
    return markdown_table(['labels', 'method', 'accuracy % (mean ± std)', 'Δ vs baseline, points (95% CI)', 'wins/ties/losses', 'steps',
                           's/run'], cells)

def plot(rows:list[dict], fracs:list[float], seeds:list[int], fname:Path):
    "Accuracy vs label ratio, one line per method, error bars = std over the paired seeds (the paper's Fig. 2)"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    paired = [Paired(rows, METHODS, seeds, 'baseline', label_fraction=lf) for lf in fracs]
    for k, m in enumerate(METHODS):
        xs, ys, es = [], [], []
        for lf, p in zip(fracs, paired):
            if not p.seeds: continue
            acc = p.values(m)*100
            xs.append(lf*100 + (k-1)*0.6); ys.append(acc.mean()); es.append(acc.std(ddof=1) if len(acc) > 1 else 0)
        ax.errorbar(xs, ys, yerr=es, marker='o', capsize=3, label=LABELS[m])
    ax.set_xlabel('labelled fraction of the training set (%)'); ax.set_ylabel('validation accuracy (%)')
    ax.set_xticks([lf*100 for lf in fracs])
    ax.set_title(f'digits 16x16, small CNN, mean ± std over {min(len(p.seeds) for p in paired)} paired seeds', fontsize=9)
    ax.legend(fontsize=8); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(fname, dpi=120); plt.close(fig)

@call_parse
def main(
    seeds:int=5, # paired seeds (each fixes split, labelled subset and initialisation for every method)
    first_seed:int=0, # seeds first_seed .. first_seed+seeds-1
    fractions:str='0.1,0.2,0.3,0.4', # label fractions, comma-separated
    steps:int=24, # training steps per run at least: epochs = ceil(steps / labelled batches per epoch)
    size:int=16, # image size
    lr:float=3e-3, # one-cycle maximum learning rate (Adam)
    bs:int=32, # labelled batch size (the unlabelled one is the same)
    weight:float=0.1, # lambda1 of CDS and semi-supervised CDS
    views:str='reference', # reference: the digits variant of the reference CIFAR views; default: digits_dls' augmentation and simclr_tfms
    threads:int=1, # torch intra-op threads
    out:str='bench/out/semisup.jsonl', # results, one JSON line per run; runs already there are skipped
    png:str='bench/out/semisup.png', # the plot
    report_only:bool=False, # only print the table (and plot) of what `out` holds
):
    "Train every method on every seed and label fraction; print a markdown table and plot accuracy vs label ratio"
    warnings.filterwarnings('ignore')
    torch.set_num_threads(threads)
    print(f"python bench/semisup.py {' '.join(sys.argv[1:])}".strip() + "\n", flush=True)
    fracs, seed_list = [float(f) for f in fractions.split(',')], list(range(first_seed, first_seed+seeds))
    n_batches = {lf: len(digits_dls(size=size, label_fraction=lf, bs=bs, device='cpu').train) for lf in fracs}  # the same for every seed
    configs = [dict(method=m, seed=s, label_fraction=lf, epochs=math.ceil(steps/n_batches[lf]), size=size, lr=lr, bs=bs, weight=weight,
                    views=views)
               for s in seed_list for lf in fracs for m in METHODS]  # seed-major: an interrupted run leaves complete seeds
    log, start = RunLog(out, KEY), time.time()
    if not report_only: log.run(configs, run, threads=threads)
    sel = log.select(configs)
    print(f"\nmachine: {torch.get_num_threads()} torch thread(s), CPU, torch {torch.__version__}; total {time.time()-start:.0f}s\n")
    print(f"digits 16x16, small_cnn, Adam one-cycle lr {lr}, bs {bs} (+{bs} unlabelled for semi-CDS), at least {steps} steps per run, "
          f"CDS weight {weight}\n")
    print(table(sel, fracs, seed_list))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    plot(sel, fracs, seed_list, Path(png))
    print(f"\nplot: {png}")
