"""The paper's distillation comparison (Table 8) in miniature, on the embedded digits: a wide CNN teacher trained with CDS,
the quickstart's small CNN as student, every method of Table 8's row.

For every seed and label fraction a teacher (`small_cnn(width=48)`: stage widths 48-96-192-384) is trained with `CDSCallback`
for 3x the students' epochs (`--teacher-factor`), then the student (`small_cnn`: 32-64-128-256) once per method of `STUDENTS`:
alone; the comparison methods with their library defaults, RepDistiller's weights (`distill_callbacks`): KD (0.1 x CE + 0.9 x
KL x T^2, T=4), FitNet (100 x the hint MSE of the second stage pair through a conv regressor), AT (1000 x the attention-map
distance of all four stage pairs), RKD (25 x distance + 50 x angle terms of the pooled last stage), SP (3000 x the batch
similarity distance of the last stage), CRD (0.8 x NCE of the pooled last stage against a memory bank, 16384 negatives from the
other classes, T=0.07) and CRD+KD; KD as CDS+KD uses it alone (`KDCallback`: soft cross-entropy, T=3, weight 1); CDS (no
teacher); CDS+KD (`CDSCallback(teacher=...)`: CDS + 0.1 x head-embedding distance through Linear adapters + soft
cross-entropy T=3, the reference code's CIFAR setting). The teacher runs in eval mode for the comparison methods
(RepDistiller) and on batch statistics for CDS+KD (the reference code); its weights and buffers never change.

A seed fixes the data split, the labelled subset, the teacher, the student's initial weights and its batches: every method of a
seed trains from the same initial weights on the same items in the same order with the same augmentation draws of view 1
(`SameBatches`), so the differences to the student alone are paired. Results go one JSON line per run to
`bench/out/distill_methods.jsonl` as they finish and each teacher to `bench/out/distill_teachers/` (`learn.save`); runs already
there are skipped and saved teachers reloaded with `load_teacher`, so an interrupted benchmark resumes. Not run by CI.
Another student method is one more entry of `STUDENTS` (and of `NO_TEACHER` if it does not use the teacher).

Deviations from the paper: digits at 16x16 (143 or 1438 training images) instead of CIFAR-100/CIFAR-10 (50,000), two small
CNNs instead of ResNet/WRN/MobileNet pairs, Adam with one-cycle for a few epochs (6 at 10 % labels, 1 at all labels) instead
of SGD over 240-300 epochs; CDS's view 2 without flip (digits are not mirror-symmetric). The comparison methods' weights were
tuned by RepDistiller for CIFAR-100 ResNets and are used unchanged; CRD's 16384 negatives exceed the training set here
(drawn with replacement: 115 / 11 x the set instead of a third of it). The paper does not name its Table 8 teachers.
"""
import random, sys, time, warnings
from functools import partial
from pathlib import Path
import torch
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.benchmark import reseed, SkipValidation, timed_fit, evaluate, RunLog, Paired, markdown_table

STUDENTS = {  # method: the student's callbacks, given the teacher and CDS's view 2; in Table 8's order, then CDS's
    'student': lambda teacher, v2: [],
    'KD': lambda teacher, v2: distill_callbacks('kd', teacher),
    'FitNet': lambda teacher, v2: distill_callbacks('fitnet', teacher, verbose=False),
    'AT': lambda teacher, v2: distill_callbacks('at', teacher, verbose=False),
    'RKD': lambda teacher, v2: distill_callbacks('rkd', teacher, verbose=False),
    'SP': lambda teacher, v2: distill_callbacks('sp', teacher, verbose=False),
    'CRD': lambda teacher, v2: distill_callbacks('crd', teacher, verbose=False),
    'CRD+KD': lambda teacher, v2: distill_callbacks('crd+kd', teacher, verbose=False),
    'KD (T=3, CE)': lambda teacher, v2: [KDCallback(teacher)],  # CDS+KD's logit term alone
    'CDS': lambda teacher, v2: [CDSCallback(view2_tfms=v2, verbose=False)],
    'CDS+KD': lambda teacher, v2: [CDSCallback(teacher=teacher, view2_tfms=v2, verbose=False)]}
METHODS = list(STUDENTS)
NO_TEACHER = {'student', 'CDS'}  # the students that do not use the teacher: their runs do not depend on its settings

class SameBatches(Callback):
    "Training batches fixed by (seed, epoch, batch): the loader's order and the random draws of each batch's transforms"
    order = 10  # after the callbacks that swap the training loader (CDSCallback's two views)
    def __init__(self, seed:int): self.seed = seed
    def _draws(self, i:int): set_seed((self.seed*1000 + self.epoch)*100_000 + i)
    def before_train(self):
        self.learn.dl.rng = random.Random(self.seed*1000 + self.epoch)  # the order (fastai draws it from this when iterated)
        self._draws(0)
    def after_batch(self): self._draws(self.iter + 1)  # the next batch is made (and augmented) after this event

def key(r:dict)->list[str]:
    "The fields that identify run `r`: those of a teacher only where the run uses one"
    teacher = [] if r['method'] in NO_TEACHER else ['teacher_epochs', 'teacher_width']
    return ['method', 'seed', 'label_fraction', 'epochs', 'size', 'lr', 'bs'] + teacher

def run(method:str, seed:int, label_fraction:float, epochs:int, teacher_epochs:int, teacher_width:int, size:int, lr:float, bs:int,
        teachers:Path, **_)->dict:
    "Train the teacher (saved in `teachers`) or one student (with the saved teacher, trained first if it is missing); accuracy and time"
    dls = digits_dls(size=size, label_fraction=label_fraction, seed=seed, bs=bs, device='cpu')
    info, v2 = dict(n_train=len(dls.train_ds), n_valid=len(dls.valid_ds)), simclr_tfms(n_channels=1, flip=False)
    tfile = teachers/f"teacher_s{seed}_lf{label_fraction}_e{teacher_epochs}_w{teacher_width}_sz{size}_lr{lr}_bs{bs}"
    def new_teacher():
        reseed(seed, dls)
        return Learner(dls, small_cnn(width=teacher_width), loss_func=CrossEntropyLossFlat(),
                       cbs=[SkipValidation(), SameBatches(seed), CDSCallback(view2_tfms=v2, verbose=False)])
    teacher = None
    if method == 'teacher' or (method not in NO_TEACHER and not Path(f'{tfile}.pth').exists()):  # not with_suffix: lr has a dot
        teacher = new_teacher()
        secs = timed_fit(teacher, teacher_epochs, lr)
        teacher.save(tfile)
        if method == 'teacher': return dict(acc=evaluate(teacher.model.model, dls.valid), secs=secs, **info)
    elif method not in NO_TEACHER: teacher = load_teacher(new_teacher, tfile)
    cbs = STUDENTS[method](teacher, v2)
    if any(isinstance(cb, CRDCallback) for cb in cbs): dls = item_index_dls(dls)  # CRD's memory needs each item's index
    reseed(seed, dls)
    model = small_cnn()  # same initial weights for every method of this seed
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[SkipValidation(), SameBatches(seed), *cbs])
    secs = timed_fit(learn, epochs, lr)
    return dict(acc=evaluate(model, dls.valid), secs=secs, **info)

def table(rows:list[dict], label_fraction:float, seeds:list[int])->str:
    "Markdown table of one label fraction over the seeds that the teacher and every method finished"
    p = Paired(rows, ['teacher'] + METHODS, seeds, 'student', label_fraction=label_fraction)
    if not p.seeds: return f"(no complete seed at {label_fraction:.0%} labels yet)"
    r0, rt = p.first('student'), p.first('teacher')
    return (f"digits {r0['size']}x{r0['size']}, {label_fraction:.0%} of the training labels ({r0['n_train']} images), "
            f"teacher {rt['teacher_epochs']} epochs, students {r0['epochs']} epochs, {len(p.seeds)} paired seeds, "
            f"{r0['n_valid']} validation images\n\n" +
            markdown_table(['model', 'accuracy % (mean ± std)', 'Δ vs student alone, points (95% CI)', 'wins/ties/losses', 's/run'],
                           [[f"teacher cnn({rt['teacher_width']}), CDS" if m == 'teacher' else f'student small_cnn, {m}',
                             p.mean_std(m), *(('—', '—') if m == 'teacher' else p.delta(m)), f"{p.mean(m, 'secs'):.1f}"]
                            for m in ['teacher'] + METHODS]))

@call_parse
def main(
    seeds:int=5, # paired seeds (each fixes split, labelled subset, teacher, student initialisation and batches)
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
    out:str='bench/out/distill_methods.jsonl', # results, one JSON line per run; runs already there are skipped
    report_only:bool=False, # only print the tables of what `out` holds
):
    "Train a CDS teacher and the student by every method per seed and label fraction; print markdown tables"
    warnings.filterwarnings('ignore')
    torch.set_num_threads(threads)
    print(f"python bench/distill.py {' '.join(sys.argv[1:])}".strip() + "\n", flush=True)
    fracs, seed_list = [float(f) for f in fractions.split(',')], list(range(first_seed, first_seed+seeds))
    teachers = (Path(out).parent/'distill_teachers').absolute(); teachers.mkdir(parents=True, exist_ok=True)
    epochs = lambda lf: epochs_low if lf < 0.5 else epochs_high
    configs = [dict(method=m, seed=s, label_fraction=lf, epochs=epochs(lf), teacher_epochs=teacher_factor*epochs(lf),
                    teacher_width=teacher_width, size=size, lr=lr, bs=bs)
               for s in seed_list for lf in fracs for m in ['teacher'] + METHODS]  # seed-major, the teacher first
    log, start = RunLog(out, key), time.time()
    if not report_only: log.run(configs, partial(run, teachers=teachers), threads=threads)
    sel = log.select(configs)
    print(f"\nmachine: {torch.get_num_threads()} torch thread(s), CPU, torch {torch.__version__}; total {time.time()-start:.0f}s\n")
    for lf in fracs: print(table(sel, lf, seed_list) + '\n')
