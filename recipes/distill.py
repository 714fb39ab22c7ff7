"""Distillation with contrastive deep supervision (paper eqs. 8-9): a CDS teacher, a smaller student, one method.

The teacher is trained with `CDSCallback` (it keeps its heads), or loaded from a `learn.save` file with `load_teacher`.
The student is then trained by `--method`:
  student  plain training, no teacher
  kd       Hinton's logit distillation from the teacher (`KDCallback`, soft cross-entropy at T=3)
  cds      CDS on the student, no teacher
  cds+kd   CDS + the distance to the teacher's head embeddings + logit distillation (`CDSCallback(teacher=...)`)
and exported as a plain model (no teacher, heads or adapters inside).

Deviations from the paper: scikit-learn's digits at 16x16 and two CNNs (the teacher twice as wide as the quickstart's
`small_cnn`) instead of ResNets on CIFAR-100/ImageNet; Adam with one-cycle over a few epochs instead of SGD over 300;
view 2 without flip on digits (they are not mirror-symmetric). Loss settings: `--setting reference` is the reference
code's CIFAR one (0.1 x un-squared batch distance per head, soft cross-entropy at T=3), `paper` the paper's equations
(squared distance, KL x T^2), `imagenet` the reference ImageNet one (weights 0.5, T=1).

    python recipes/distill.py                      # digits, 10 % of the labels, cds+kd
    python recipes/distill.py --method kd --label-fraction 1
    python recipes/distill.py --teacher resnet34 --student resnet18 --dataset IMAGENETTE_160 --size 128
"""
import sys, tempfile, warnings
from pathlib import Path
import torchvision
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import small_cnn  # noqa: E402
from _common import folder_dls, get_path, print_export  # noqa: E402,F401  (get_path: tests call it)

METHODS = ('student', 'kd', 'cds', 'cds+kd')

def cnn(width:int=32, n_in:int=1, n_out:int=10)->nn.Sequential:
    "The quickstart's `small_cnn` with stage widths `width` x (1, 2, 4, 8); `width=32` is `small_cnn` itself"
    if width == 32: return small_cnn(n_in, n_out)
    c = [width*k for k in (1, 2, 4, 8)]
    return nn.Sequential(ConvLayer(n_in, c[0]), ConvLayer(c[0], c[0]), ConvLayer(c[0], c[1], stride=2), ConvLayer(c[1], c[1]),
                         ConvLayer(c[1], c[2], stride=2), ConvLayer(c[2], c[2]), ConvLayer(c[2], c[3], stride=2), ConvLayer(c[3], c[3]),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c[3], n_out))

def get_dls(dataset:str, size:int, bs:int, label_fraction:float, seed:int, valid_pct:float=0.2)->DataLoaders:
    "Digits (embedded; `valid_pct` of it for validation), a fastai `URLs` name or a folder with train/ and valid/ (or val/, test/)"
    if dataset == 'digits': return digits_dls(size=size, bs=bs, label_fraction=label_fraction, seed=seed, valid_pct=valid_pct)
    dls = folder_dls(dataset, size, bs, seed)
    return dls if label_fraction == 1 else split_labelled(dls, label_fraction, seed)[0]

def make_learner(arch:str, dls:DataLoaders, cbs:list, pretrained:bool=False)->Learner:
    "'cnn' / 'cnn:WIDTH' (the quickstart's CNN, stage widths WIDTH x 1,2,4,8) or a torchvision model name"
    n_in = dls.one_batch()[0].shape[1]
    if arch.split(':')[0] == 'cnn':
        width = int(arch.split(':')[1]) if ':' in arch else 32
        return Learner(dls, cnn(width, n_in, dls.c), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    return vision_learner(dls, getattr(torchvision.models, arch), n_in=n_in, pretrained=pretrained, metrics=accuracy, cbs=cbs)

def speedups(learn:Learner, fp16:bool, channels_last:bool)->Learner:
    "Mixed precision and channels-last memory format, as asked"
    if fp16: to_mixed_precision(learn)
    if channels_last: learn.to_channelslast(use_amp=False)
    return learn

def student_cbs(method:str, teacher:Learner, view2_tfms:list|None, setting:str, features:str)->list:
    "The student's callbacks for `method`"
    presets = {'reference': Distiller, 'paper': Distiller.paper, 'imagenet': Distiller.imagenet}
    if method == 'student': return []
    if method == 'kd': return [KDCallback(teacher, T=1. if setting == 'imagenet' else 3., kl=setting == 'paper')]
    if method == 'cds': return [CDSCallback(view2_tfms=view2_tfms)]
    return [CDSCallback(teacher=presets[setting](teacher, features=features), view2_tfms=view2_tfms)]

@call_parse
def main(
    method:str='cds+kd', # how the student learns: student, kd, cds or cds+kd
    teacher:str='cnn:64', # teacher architecture: cnn, cnn:WIDTH or a torchvision name (resnet34, ...)
    student:str='cnn', # student architecture: cnn (the quickstart's small_cnn), cnn:WIDTH or a torchvision name
    dataset:str='digits', # digits (embedded, offline), a fastai URLs name (downloaded: CIFAR, IMAGENETTE_160) or a folder
    label_fraction:float=0.1, # stratified fraction of the training labels kept (teacher and student)
    epochs:int=30, # student epochs
    teacher_epochs:int=30, # teacher epochs
    lr:float=3e-3, # one-cycle maximum learning rate (Adam)
    bs:int=32, # batch size
    size:int=16, # image size
    seed:int=0, # fixes the split, the initialisations and the augmentation
    setting:str='reference', # distillation loss: reference (CIFAR code), paper (eqs. 8-9) or imagenet (reference ImageNet code)
    features:str='heads', # what cds+kd distils: heads (head embeddings) or stages (pooled raw stage outputs, the ablation)
    teacher_file:str='', # load the teacher from this `learn.save` file (.pth) (same --teacher arch) instead of training it
    save_teacher:str='', # save the trained teacher to this file (`learn.save`), for a later --teacher-file
    pretrained:bool=False, # ImageNet weights for torchvision architectures (downloads them)
    fp16:bool=False, # mixed precision: bfloat16 where the device supports it (CPU too), else float16 (fastai's to_fp16)
    channels_last:bool=False, # channels-last memory format (`to_channelslast`)
    export:str='distill_student.pkl', # where to export the student ('' to skip)
    threads:int=0, # torch intra-op threads (0: torch's default; 1 is often faster for small models on a busy CPU)
    smoke:bool=False, # a tiny fast run of the same code path: 1 epoch each on a few digits, 1 thread; exports to a temporary folder unless --export is given
):
    "Train (or load) a CDS teacher, then a student by `method`; print both accuracies; export the student"
    if method not in METHODS: raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    warnings.filterwarnings('ignore')
    valid_pct = 0.2
    if smoke:
        epochs, teacher_epochs, bs, threads, valid_pct = 1, 1, 16, 1, 0.05
        if dataset == 'digits': label_fraction = min(label_fraction, 0.05)
        if export == 'distill_student.pkl': export = str(Path(tempfile.mkdtemp())/export)  # the default goes to a temporary folder
    if threads: torch.set_num_threads(threads)
    set_seed(seed, reproducible=True)
    v2 = simclr_tfms(n_channels=1, flip=False) if dataset == 'digits' else None  # None: the reference view 2
    teacher_file, save_teacher = (str(Path(f.removesuffix('.pth')).absolute()) if f else '' for f in (teacher_file, save_teacher))  # learn.save adds .pth

    # ---- what a user writes: data, teacher, student, fit, export
    dls = get_dls(dataset, size, bs, label_fraction, seed, valid_pct)
    new_teacher = lambda: make_learner(teacher, dls, [CDSCallback(view2_tfms=v2)], pretrained)
    if teacher_file: t = load_teacher(new_teacher, teacher_file)
    else:
        t = speedups(new_teacher(), fp16, channels_last)
        t.fit_one_cycle(teacher_epochs, lr)
        if save_teacher: t.save(save_teacher)
    learn = speedups(make_learner(student, dls, student_cbs(method, t, v2, setting, features), pretrained), fp16, channels_last)
    learn.fit_one_cycle(epochs, lr)
    if export: learn.export(Path(export).absolute())

    # ---- report
    with t.no_bar(), learn.no_bar():
        t_acc, s_acc = float(t.validate()[1]), float(learn.validate()[1])
    print(f"{dataset}, {label_fraction:.0%} of the training labels: teacher {teacher} {t_acc*100:.2f}%, "
          f"student {student} ({method}) {s_acc*100:.2f}%")
    if export: print_export(export, 'student')
