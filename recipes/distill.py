"""Distillation with contrastive deep supervision (paper eqs. 8-9) and the methods it is compared with (Tables 7 and 8).

A CDS teacher (it keeps its heads) and a student trained by `--method`:
  student  the student alone, no teacher (the tables' Base)
  kd, fitnet, at, sp, rkd, crd, crd+kd   the comparison methods with RepDistiller's weights (`distill_callbacks`)
  cds      CDS on the student, no teacher
  cds+kd   CDS + the distance to the teacher's head embeddings + logit distillation (`CDSCallback(teacher=...)`, the paper's)
The student is exported as a plain model (no teacher, heads or adapters inside).

`--setting cifar` (the default for cifar10/cifar100) is the reference code's CIFAR distillation (CIFAR/distill.py): the
networks of Tables 1, 2 and 8 with their CIFAR stem and one fc (`cifar_model`; teacher resnet50, student resnet18),
`reference_views('cifar')`, SGD momentum 0.9, weight decay 5e-4 on every parameter, lr 0.1, batch 128, 300 epochs, lr /10
at epochs 90, 180 and 280, the best and last top-1 reported with the paper's number of the student's row (Table 8).
`--setting imagenet` (the default for imagenet) is recipes/imagenet.py's setting (torchvision ResNets without their
max-pool, `reference_views('imagenet')`, weight decay 1e-4, batch 256, 90 epochs, lr /10 every 30; Table 7). In both
the teacher is a file that the CIFAR (ImageNet) recipe writes, as the reference trains its teacher with its CIFAR script:

    python recipes/cifar.py --dataset cifar100 --arch resnet50 --method cds --save-model teacher.pth  # the teacher, heads kept
    python recipes/distill.py --dataset cifar100 --teacher-file teacher.pth --method cds+kd   # ResNet18 student, paper: 83.31 %
    python recipes/distill.py --dataset cifar100 --teacher-file teacher.pth --method crd      # Table 8's CRD column: 81.41 %

A teacher file without CDS heads (a baseline's) is refused before any training. The teacher runs in train mode
(BatchNorm on batch statistics, its buffers never written) with its heads, as in both reference scripts, for every
method (`--teacher-eval`: eval mode, as RepDistiller runs its teachers). Loss settings of cds+kd (`--loss`,
`reference_distillation`): cifar = CIFAR/distill.py (0.1 x un-squared batch distance per head, soft cross-entropy at T=3,
contrastive 0.1 per head), imagenet = the reference ImageNet KD script (distance 0.5 per head, soft cross-entropy at T=1,
contrastive 0.5 per head), paper = eqs. 8-9 (squared distance, KL x T^2); the default is the setting's.

`--setting small` (the default on digits, and of `--smoke`) is a quick departure: scikit-learn's digits at 16x16, a CNN
teacher (twice the quickstart's `small_cnn`'s width) trained here with CDS, the `small_cnn` student, 10 % of the labels,
Adam with one-cycle over 30 epochs, batch 32, view 2 without flip (digits are not mirror-symmetric):

    python recipes/distill.py                      # digits, 10 % of the labels, cds+kd
    python recipes/distill.py --method kd --label-fraction 1
"""
import warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from fastai_cds.recipe import *  # before torch: it lets idle CPU threads sleep (OMP_WAIT_POLICY)
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.embedding_distill import DISTILL_METHODS

METHODS = ('student', *DISTILL_METHODS, 'cds', 'cds+kd')
SETTINGS = {'small': dict(teacher='cnn:64', student='cnn', epochs=30, lr=3e-3, bs=32, size=16, wd=1e-2, loss='cifar'),
            'cifar': dict(teacher='resnet50', student='resnet18', epochs=300, lr=0.1, bs=128, size=32, wd=5e-4, loss='cifar'),
            'imagenet': dict(teacher='resnet50', student='resnet18', epochs=90, lr=0.1, bs=256, size=224, wd=1e-4, loss='imagenet')}

@call_parse
@recipe_options(wd=None)
def main(
    method:str='cds+kd', # how the student learns: student, kd, fitnet, at, sp, rkd, crd, crd+kd, cds or cds+kd
    dataset:str='digits', # digits (embedded), cifar10, cifar100, imagenet or a fastai URLs name in lower case (--path: a local copy)
    setting:str='', # cifar or imagenet (the reference's training; the default for those datasets), small (digits' quick one)
    teacher:str='', # teacher architecture (cifar: a `CIFAR_ARCHS` name, resnet50; imagenet: resnet50; small: cnn:64)
    student:str='', # student architecture (cifar: a `CIFAR_ARCHS` name, resnet18; imagenet: resnet18; small: cnn, cnn:WIDTH, torchvision's)
    teacher_file:str='', # the teacher: a .pth file with CDS heads (cifar.py --method cds --save-model FILE); needed by cifar, imagenet
    label_fraction:float=0.1, # small: stratified fraction of the training labels kept (teacher and student); cifar, imagenet: all
    epochs:int=None, # student epochs (cifar: 300, imagenet: 90, small: 30)
    teacher_epochs:int=30, # small: epochs of the teacher trained here
    lr:float=None, # learning rate (cifar, imagenet: 0.1, SGD, step schedule; small: 3e-3, Adam one-cycle maximum)
    bs:int=None, # batch size (cifar: 128, imagenet: 256, small: 32)
    size:int=None, # image size (cifar: 32, imagenet: 224, small: 16)
    loss:str='', # distillation loss of cds+kd: cifar (reference CIFAR code), imagenet (reference ImageNet code) or paper (eqs. 8-9)
    teacher_eval:bool=False, # the teacher in eval mode (a departure: the reference runs it in train mode)
    features:str='heads', # what cds+kd distils: heads (head embeddings) or stages (pooled raw stage outputs, the ablation)
    save_teacher:str='', # small: save the teacher trained here to this file (`learn.save`), for a later --teacher-file
    **kwargs):
    "Load (or train) a CDS teacher, then train a student by `method`; print both accuracies; export the student"
    run = RecipeRun('distill', **kwargs)
    setting = setting or {'cifar10': 'cifar', 'cifar100': 'cifar', 'imagenet': 'imagenet'}.get(dataset, 'small')
    if method not in METHODS or setting not in SETTINGS or loss not in ('', 'cifar', 'imagenet', 'paper'): raise ValueError(
        f"--method {method} --setting {setting} --loss {loss}: pick --method {', '.join(METHODS)}; --setting cifar, imagenet or "
        "small; --loss cifar, imagenet or paper")
    d, reference, trained_here = SETTINGS[setting], setting != 'small', not teacher_file
    teacher, student, loss, epochs = teacher or d['teacher'], student or d['student'], loss or d['loss'], epochs or d['epochs']
    lr, bs, size, wd = lr or d['lr'], bs or d['bs'], size or d['size'], d['wd'] if run.wd is None else run.wd
    if run.smoke: epochs, teacher_epochs, bs, size = 1, 1, 8 if reference else 16, {'cifar': 16, 'imagenet': 32}.get(setting, size)
    if run.smoke: dataset, label_fraction = {'cifar': 'cifar100', 'imagenet': 'imagenet'}.get(setting, 'digits'), min(label_fraction, 0.05)
    if teacher_file: teacher_file = teacher_with_heads(teacher_file)  # before any data or training
    elif reference and not run.smoke: raise ValueError(
        f"--setting {setting} distils a teacher trained by the {setting} recipe: pass --teacher-file FILE, written by "
        f"recipes/{setting}.py --arch {teacher} --method cds --save-model FILE")
    new_cds = lambda **kw: CDSCallback(view2_tfms=v2, cross_rank=run.cross_rank, **kw)
    if reference:
        make_dls, v2, model, check, fit = reference_setting(setting, dataset, run, size, bs)
        check(student), check(teacher)  # before the data
        dls, labels, metrics = make_dls(), 'all', [accuracy] + ([partial(top_k_accuracy, k=5)] if setting == 'imagenet' else [])
        new_learner = lambda arch, cbs: reference_learner(dls, model(arch, dls.c), wd, metrics, cbs)
    else:
        dls, _ = labelled_data(dataset, size, bs, label_fraction, run.seed, 0.05 if run.smoke else 0.2, path=run.path,
                               num_workers=run.workers)
        v2 = simclr_tfms(n_channels=1, flip=False) if dataset == 'digits' else None  # None: the default view 2
        fit, labels = lambda learn, epochs, lr: learn.fit_one_cycle(epochs, lr), f'{label_fraction:.0%}'
        new_learner = lambda arch, cbs: arch_learner(arch, dls, cbs, run.pretrained, wd=wd)
    def new_teacher()->Learner:
        learn = new_learner(teacher, [new_cds()])
        if teacher_file: learn.model_dir = Path(teacher_file).parent  # fastai's save and load make this folder: the file's own
        return learn
    t = run.learner(new_teacher(), tag='teacher') if trained_here else load_teacher(new_teacher, teacher_file, with_opt=False)
    with run.training(t):  # the teacher's row before the student's training: a teacher in train mode moves its BatchNorm statistics
        if trained_here: fit(t, teacher_epochs, lr)
        run.report(t, dict(dataset=dataset, labels=labels, model='teacher', arch=teacher, method='cds', epochs=teacher_epochs if
                           trained_here else 'loaded'), paper_top1(dataset, teacher, method='cds') if reference else None)
    if trained_here and (save_teacher or reference):  # a reference setting's smoke: the teacher through its file, as a user's
        teacher_file = str((Path(save_teacher) if save_teacher else shared_temp_folder()/'teacher.pth').absolute()).removesuffix('.pth')
        t.model_dir = Path(teacher_file).parent
        t.save(teacher_file, with_opt=False)
        if reference: t = load_teacher(new_teacher, teacher_with_heads(teacher_file + '.pth'), with_opt=False)
    weight, distiller = reference_distillation(t, loss, features=features, teacher_bn_train=not teacher_eval)
    cbs = (distill_callbacks(method, t, teacher_bn_train=not teacher_eval) if method in DISTILL_METHODS else
           {'student': [], 'cds': [new_cds(weight=weight)], 'cds+kd': [new_cds(weight=weight, teacher=distiller)]}[method])
    if method.startswith('crd'): dls = item_index_dls(dls)  # CRD's memory bank: each item's index in the training set
    learn = run.learner(new_learner(student, cbs + [BestMetrics()]), tag='student', first=not trained_here)
    with run.training(learn):
        fit(learn, epochs, lr)
        paper = paper_top1(dataset, student, method='cds') if method == 'cds' else paper_top1(dataset, student, 'distill', method=method)
        run.report(learn, dict(dataset=dataset, labels=labels, model='student', arch=student, method=method, epochs=epochs),
                   paper if label_fraction == 1 or reference else None)
    run.finish(learn, 'student')
