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
The result table gives the paper's number of the student for CIFAR-10/100 and ImageNet ResNet students (Tables 7-8).

    python recipes/distill.py                      # digits, 10 % of the labels, cds+kd
    python recipes/distill.py --method kd --label-fraction 1
    python recipes/distill.py --teacher resnet34 --student resnet18 --dataset imagenette_160 --size 128
"""
import warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from fastai_cds.recipe import *  # before torch: it lets idle CPU threads sleep (OMP_WAIT_POLICY)
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

@call_parse
@recipe_options()
def main(
    method:str='cds+kd', # how the student learns: student, kd, cds or cds+kd
    teacher:str='cnn:64', # teacher architecture: cnn, cnn:WIDTH or a torchvision name (resnet34, ...)
    student:str='cnn', # student architecture: cnn (the quickstart's small_cnn), cnn:WIDTH or a torchvision name
    dataset:str='digits', # digits (embedded), cifar10, cifar100, imagenet or a fastai URLs name in lower case (--path: a local copy)
    label_fraction:float=0.1, # stratified fraction of the training labels kept (teacher and student)
    epochs:int=30, # student epochs
    teacher_epochs:int=30, # teacher epochs
    lr:float=3e-3, # one-cycle maximum learning rate (Adam)
    bs:int=32, # batch size
    size:int=16, # image size
    setting:str='cifar', # distillation loss: cifar (reference CIFAR code), imagenet (reference ImageNet code) or paper (eqs. 8-9)
    teacher_eval:bool=False, # the teacher in eval mode (a departure: the reference runs it in train mode)
    features:str='heads', # what cds+kd distils: heads (head embeddings) or stages (pooled raw stage outputs, the ablation)
    teacher_file:str='', # load the teacher from this `learn.save` file (.pth) (same --teacher arch) instead of training it
    save_teacher:str='', # save the trained teacher to this file (`learn.save`), for a later --teacher-file
    **kwargs):
    "Train (or load) a CDS teacher, then a student by `method`; print both accuracies; export the student"
    run = RecipeRun('distill', **kwargs)
    if method not in ('student', 'kd', 'cds', 'cds+kd') or setting not in ('cifar', 'imagenet', 'paper'): raise ValueError(
        f"--method {method} --setting {setting}: pick --method student, kd, cds or cds+kd and --setting cifar, imagenet or paper")
    if run.smoke: dataset, epochs, teacher_epochs, bs, label_fraction = 'digits', 1, 1, 16, min(label_fraction, 0.05)
    dls, _ = labelled_data(dataset, size, bs, label_fraction, run.seed, 0.05 if run.smoke else 0.2, path=run.path, num_workers=run.workers)
    v2 = simclr_tfms(n_channels=1, flip=False) if dataset == 'digits' else None  # None: the default view 2
    labels, cds = f'{label_fraction:.0%}', lambda **kw: CDSCallback(view2_tfms=v2, cross_rank=run.cross_rank, **kw)
    new_teacher = lambda: arch_learner(teacher, dls, [cds()], run.pretrained, wd=run.wd)
    if teacher_file: t = load_teacher(new_teacher, str(Path(teacher_file.removesuffix('.pth')).absolute()))
    else: t = run.learner(new_teacher(), tag='teacher')
    with run.training(t):  # the teacher's row before the student's training: a teacher in train mode moves its BatchNorm statistics
        if not teacher_file: t.fit_one_cycle(teacher_epochs, lr)
        run.report(t, dict(dataset=dataset, labels=labels, model='teacher', arch=teacher, method='cds',
                           epochs='loaded' if teacher_file else teacher_epochs))
    if save_teacher: t.save(Path(save_teacher.removesuffix('.pth')).absolute())
    weight, distiller = reference_distillation(t, setting, features=features, teacher_bn_train=not teacher_eval)
    cbs = {'student': [], 'kd': [KDCallback(t, T=distiller.T, kl=distiller.kl, teacher_bn_train=not teacher_eval)],
           'cds': [cds(weight=weight)], 'cds+kd': [cds(weight=weight, teacher=distiller)]}[method]
    learn = run.learner(arch_learner(student, dls, cbs, run.pretrained, wd=run.wd), tag='student', first=bool(teacher_file))
    with run.training(learn):
        learn.fit_one_cycle(epochs, lr)
        run.report(learn, dict(dataset=dataset, labels=labels, model='student', arch=student, method=method, epochs=epochs),
                   paper_top1(dataset, student, 'distill', method=method) if label_fraction == 1 else None)
    run.finish(learn, 'student')
