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
view 2 without flip on digits (they are not mirror-symmetric). Loss settings (`reference_distillation`): `--setting cifar`
is the reference code's CIFAR one (CIFAR/distill.py: 0.1 x un-squared batch distance per head, soft cross-entropy at
T=3, contrastive 0.1 per head), `imagenet` the reference ImageNet one (distance 0.5 per head, soft cross-entropy
weight 1 at T=1, contrastive 0.5 per head), `paper` the paper's equations (squared distance, KL x T^2). The teacher runs
in train mode (BatchNorm on batch statistics) as in both reference scripts; `--teacher-eval` runs it in eval mode.

    python recipes/distill.py                      # digits, 10 % of the labels, cds+kd
    python recipes/distill.py --method kd --label-fraction 1
    python recipes/distill.py --teacher resnet34 --student resnet18 --dataset IMAGENETTE_160 --size 128
"""
import tempfile, warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.recipe import *
from fastai_cds.parallel import rank0_print

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
    setting:str='cifar', # distillation loss: cifar (reference CIFAR code), imagenet (reference ImageNet code) or paper (eqs. 8-9)
    teacher_eval:bool=False, # the teacher in eval mode (a departure: the reference runs it in train mode)
    features:str='heads', # what cds+kd distils: heads (head embeddings) or stages (pooled raw stage outputs, the ablation)
    teacher_file:str='', # load the teacher from this `learn.save` file (.pth) (same --teacher arch) instead of training it
    save_teacher:str='', # save the trained teacher to this file (`learn.save`), for a later --teacher-file
    pretrained:bool=False, # ImageNet weights for torchvision architectures (downloads them)
    fp16:bool=False, # mixed precision: bfloat16 where the device supports it (CPU too), else float16 (fastai's to_fp16)
    channels_last:bool=False, # channels-last memory format (fastai's ChannelsLast callback)
    compile:bool=False, # torch.compile the model with its heads (CompileCallback; the export is the plain model)
    export:str='distill_student.pkl', # where to export the student ('' to skip)
    sync_bn:bool=False, # under N processes on GPUs: BatchNorm statistics over all processes' batches (nn.SyncBatchNorm)
    cross_rank:bool=False, # under N processes: the contrastive loss contrasts each process's images with every process's (CDS methods)
    checkpoint:str='checkpoint.pth', # the file of --checkpoint-every and --resume: FILE.teacher.pth and FILE.student.pth
    checkpoint_every:int=0, # save the state of training every N epochs and after the last (0: never)
    resume:bool=False, # continue the run saved in --checkpoint: the epochs done are skipped, the schedule goes on where it stopped
    smoke:bool=False, # a tiny run of the same code path: 1 epoch each on a few digits; exports to a temporary folder unless --export is given
):
    "Train (or load) a CDS teacher, then a student by `method`; print both accuracies; export the student"
    if method not in ('student', 'kd', 'cds', 'cds+kd') or setting not in ('cifar', 'imagenet', 'paper'): raise CliError(
        f"--method {method} --setting {setting}: pick --method student, kd, cds or cds+kd and --setting cifar, imagenet or paper")
    valid_pct = 0.05 if smoke else 0.2
    if smoke:
        epochs, teacher_epochs, bs = 1, 1, 16
        if dataset == 'digits': label_fraction = min(label_fraction, 0.05)
        if export == 'distill_student.pkl': export = str(Path(tempfile.mkdtemp())/export)  # the default goes to a temporary folder
    init_distributed()  # launched on N processes (torchrun, accelerate launch): join them, this process's GPU first
    set_seed(seed, reproducible=True)
    dls, _ = labelled_data(dataset, size, bs, label_fraction, seed, valid_pct)
    v2 = simclr_tfms(n_channels=1, flip=False) if dataset == 'digits' else None  # None: the default view 2
    new_teacher = lambda cbs=(): arch_learner(teacher, dls, [CDSCallback(view2_tfms=v2, cross_rank=cross_rank), *cbs], pretrained)
    if teacher_file: t = load_teacher(new_teacher, str(Path(teacher_file.removesuffix('.pth')).absolute()))
    else:
        t = speedups(new_teacher(checkpointing(checkpoint, checkpoint_every, resume, tag='teacher')), fp16, channels_last, compile)
        with distributed(t, sync_bn): t.fit_one_cycle(teacher_epochs, lr)
        if save_teacher: t.save(Path(save_teacher.removesuffix('.pth')).absolute())
    with distributed(t), t.no_bar(): t_acc = float(t.validate()[1])  # before the student: a teacher in train mode moves its BatchNorm statistics
    weight, distiller = reference_distillation(t, setting, features=features, teacher_bn_train=not teacher_eval)
    cbs = {'student': [], 'kd': [KDCallback(t, T=distiller.T, kl=distiller.kl, teacher_bn_train=not teacher_eval)],
           'cds': [CDSCallback(weight, view2_tfms=v2, cross_rank=cross_rank)],
           'cds+kd': [CDSCallback(weight, view2_tfms=v2, cross_rank=cross_rank, teacher=distiller)]}[method]
    ck = checkpointing(checkpoint, checkpoint_every, resume, tag='student', first=bool(teacher_file))
    learn = speedups(arch_learner(student, dls, cbs + ck, pretrained), fp16, channels_last, compile)
    with distributed(learn, sync_bn):
        learn.fit_one_cycle(epochs, lr)
        with learn.no_bar(): s_acc = float(learn.validate()[1])
    rank0_print(f"{dataset}, {label_fraction:.0%} of the training labels: teacher {teacher} {t_acc*100:.2f}%, student {student} ({method}) {s_acc*100:.2f}%")
    if export: export_and_check(learn, export, 'student')
