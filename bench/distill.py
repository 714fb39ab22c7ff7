"""Distillation on the embedded digits: a wide CNN teacher trained with CDS, the quickstart's small CNN as student.

For every seed and label fraction a teacher (`small_cnn(width=48)`: stage widths 48-96-192-384) is trained
with `CDSCallback` for 3x the students' epochs (`--teacher-factor`), then the student (`small_cnn`:
32-64-128-256) four ways from the same initial weights: alone, with KD (`KDCallback`, soft cross-entropy T=3), with CDS (no teacher) and with CDS+KD
(`CDSCallback(teacher=...)`: CDS + 0.1 x head-embedding distance through Linear adapters + soft cross-entropy T=3, the
reference code's CIFAR setting). A seed fixes the data split, the labelled subset, the teacher and the student's
initialisation, so the differences to the student alone are paired. Results go one JSON line per run to
`bench/out/distill.jsonl` as they finish and each teacher to `bench/out/distill_teachers/` (`learn.save`); runs already
there are skipped and saved teachers reloaded with `load_teacher`, so an interrupted benchmark resumes. Not run by CI.

Deviations from the paper: digits at 16x16 instead of CIFAR-100/ImageNet, two CNNs instead of ResNets, Adam with
one-cycle and few epochs instead of SGD over 300 epochs; view 2 without flip (digits are not mirror-symmetric).
"""
import sys, time, warnings
from pathlib import Path
import numpy as np
import torch
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from paired import reseed, SkipValidation, fit, evaluate, load_rows, append_row, complete, mean_std, delta_cells

METHODS = ['student', 'KD', 'CDS', 'CDS+KD']

def student_cbs(method:str, teacher:Learner, v2:list)->list:
    return {'student': [], 'KD': [KDCallback(teacher)], 'CDS': [CDSCallback(view2_tfms=v2, verbose=False)],
            'CDS+KD': [CDSCallback(teacher=teacher, view2_tfms=v2, verbose=False)]}[method]

def table(rows:list[dict], label_fraction:float, seeds:list[int])->str:
    "Markdown table of one label fraction over the seeds that the teacher and every method finished"
    by, done = complete(rows, label_fraction, seeds, ['teacher'] + METHODS)
    if not done: return f"(no complete seed at {label_fraction:.0%} labels yet)"
    r0, rt = by[('student', done[0])], by[('teacher', done[0])]
    out = [f"digits {r0['size']}x{r0['size']}, {label_fraction:.0%} of the training labels ({r0['n_train']} images), "
           f"teacher {rt['teacher_epochs']} epochs, students {r0['epochs']} epochs, {len(done)} paired seeds, "
           f"{r0['n_valid']} validation images",
           "", "| model | accuracy % (mean ± std) | Δ vs student alone, points (95% CI) | wins/ties/losses | s/run |",
           "|---|---|---|---|---|"]
    base = np.array([by[('student', s)]['acc'] for s in done])
    for m in ['teacher'] + METHODS:
        acc, secs = np.array([by[(m, s)]['acc'] for s in done]), np.mean([by[(m, s)]['secs'] for s in done])
        name = f"teacher cnn({r0['teacher_width']}), CDS" if m == 'teacher' else f'student small_cnn, {m}'
        diff, wtl = ('—', '—') if m in ('teacher', 'student') else delta_cells(acc, base)
        out.append(f"| {name} | {mean_std(acc)} | {diff} | {wtl} | {secs:.1f} |")
    return '\n'.join(out)

@call_parse
def main(
    seeds:int=5, # paired seeds (each fixes split, labelled subset, teacher and student initialisation)
    first_seed:int=0, # seeds first_seed .. first_seed+seeds-1
    fractions:str='0.1,1.0', # label fractions, comma-separated
    epochs_low:int=6, # epochs (teacher and students) at label fractions below 0.5 (few batches per epoch)
    epochs_high:int=1, # epochs at label fractions of 0.5 and more
    teacher_factor:int=3, # the teacher trains teacher_factor x the students' epochs (a teacher better than the student)
    teacher_width:int=48, # the teacher's first stage width (the student's is 32)
    size:int=16, # image size
    lr:float=3e-3, # one-cycle maximum learning rate (Adam)
    bs:int=32, # batch size
    threads:int=1, # torch intra-op threads
    out:str='bench/out/distill.jsonl', # results, one JSON line per run; runs already there are skipped
    report_only:bool=False, # only print the tables of what `out` holds
):
    "Train a CDS teacher and four students per seed and label fraction; print markdown tables"
    warnings.filterwarnings('ignore')
    torch.set_num_threads(threads)
    print(f"python bench/distill.py {' '.join(sys.argv[1:])}".strip() + "\n", flush=True)
    fracs, seed_list = [float(f) for f in fractions.split(',')], list(range(first_seed, first_seed+seeds))
    path = Path(out); path.parent.mkdir(parents=True, exist_ok=True)
    tdir = (path.parent/'distill_teachers').absolute(); tdir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(path)
    cfg = lambda lf: dict(label_fraction=lf, epochs=epochs_low if lf < 0.5 else epochs_high, teacher_epochs=teacher_factor*(epochs_low if lf < 0.5 else epochs_high),
                          teacher_width=teacher_width, size=size, lr=lr, bs=bs)
    key = lambda r: tuple(r[k] for k in ('method', 'seed', 'label_fraction', 'epochs', 'size', 'lr', 'bs')) + (  # runs without a teacher
        (r['teacher_epochs'], r['teacher_width']) if r['method'] in ('teacher', 'KD', 'CDS+KD') else ())  # don't depend on it
    have = {key(r) for r in rows}
    v2 = simclr_tfms(n_channels=1, flip=False)
    start = time.time()
    def record(r):
        rows.append(r); have.add(key(r)); append_row(path, r)
        print(f"seed {r['seed']} {r['label_fraction']:.0%} {r['method']:<8} acc {r['acc']*100:6.2f}%  {r['secs']:6.1f}s  "
              f"(total {time.time()-start:6.0f}s)", flush=True)
    if not report_only:
        for seed in seed_list:  # seed-major: an interrupted run leaves complete seeds
            for lf in fracs:
                c = cfg(lf)
                todo = [m for m in ['teacher'] + METHODS if key(dict(method=m, seed=seed, **c)) not in have]
                if not todo: continue
                dls = digits_dls(size=size, label_fraction=lf, seed=seed, bs=bs, device='cpu')
                info = dict(n_train=len(dls.train_ds), n_valid=len(dls.valid_ds), threads=threads)
                tfile = tdir/f"teacher_s{seed}_lf{lf}_e{c['teacher_epochs']}_w{teacher_width}_sz{size}_lr{lr}_bs{bs}"
                def new_teacher():
                    reseed(seed, dls)
                    return Learner(dls, small_cnn(width=teacher_width), loss_func=CrossEntropyLossFlat(),
                                   cbs=[SkipValidation(), CDSCallback(view2_tfms=v2, verbose=False)])
                if 'teacher' in todo or not tfile.with_suffix('.pth').exists():
                    teacher = new_teacher()
                    secs = fit(teacher, c['teacher_epochs'], lr)
                    teacher.save(tfile)
                    if 'teacher' in todo: record(dict(method='teacher', seed=seed, **c, acc=evaluate(teacher.model.model, dls.valid), secs=secs, **info))
                else: teacher = load_teacher(new_teacher, tfile)
                for m in METHODS:
                    if m not in todo: continue
                    reseed(seed, dls)
                    model = small_cnn()  # same initial weights for every method of this seed
                    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[SkipValidation(), *student_cbs(m, teacher, v2)])
                    secs = fit(learn, c['epochs'], lr)
                    record(dict(method=m, seed=seed, **c, acc=evaluate(model, dls.valid), secs=secs, **info))
    sel = [r for r in rows if key(r) == key(dict(method=r['method'], seed=r['seed'], **cfg(r['label_fraction'])))]
    print(f"\nmachine: {torch.get_num_threads()} torch thread(s), CPU, torch {torch.__version__}; total {time.time()-start:.0f}s\n")
    for lf in fracs: print(table(sel, lf, seed_list) + '\n')
