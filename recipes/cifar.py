"""CIFAR-10 / CIFAR-100 with contrastive deep supervision, or a baseline, in the reference code's setting.

The reference setting (CIFAR/train.py) is the default: ResNet18 with a CIFAR stem, CDS with SupCon heads (weight 0.1,
tau 0.07) initialised as the reference's, the reference's two views (`reference_views('cifar')`: view 1 = pad 4 with
grey + random crop, flip, Cutout 16x16 before normalisation; view 2 = pad 4 + crop, flip, grouped colour jitter p=0.8,
grayscale 0.2; each an independent crop of the raw image, made per image on the device), the reference's mean and
std, SGD momentum 0.9, weight decay 5e-4 on every parameter, lr 0.1, batch 128, 300 epochs, lr /10 at epochs 90, 180
and 280, and the best test accuracy over the epochs reported beside the last:

    python recipes/cifar.py --dataset cifar100 --method cds      # paper: 80.84 % top-1 (baseline 77.45 %)

What still differs from the reference, and the flags that depart further from it: recipes/README.md.
"""
import warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from fastai_cds.recipe import *  # before torch: it lets idle CPU threads sleep (OMP_WAIT_POLICY)
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

@call_parse
@recipe_options(but='pretrained', wd=5e-4)
def main(
    dataset:str='cifar100', # cifar10 or cifar100 (--path: a local copy, train/ and test/ folders, one subfolder per class)
    arch:str='resnet18', # a torchvision ResNet-family architecture: resnet18, resnet50, wide_resnet50_2, resnext50_32x4d, ...
    cifar_stem:Switch=True, # 3x3 stride-1 first conv and no max-pool, as the reference's ResNet (--no-cifar-stem: torchvision's)
    method:str='cds', # base (CE only), dsn, dks, dhm (deep-supervision baselines), cds (SupCon heads, the paper's), cds-simclr
    schedule:str='reference', # reference: SGD, lr /10 at epochs 90, 180, 280 of 300 (scaled to --epochs); one-cycle: fastai's fit_one_cycle
    epochs:int=300, # training epochs
    bs:int=128, # batch size (CDS also runs a second view of each image)
    lr:float=0.1, # learning rate (one-cycle: the peak)
    cutout:int=16, # side of view 1's Cutout square in pixels (0: no Cutout)
    in_memory:Switch=True, # decode the images once (by --workers processes), batches index them (--no-in-memory: fastai's per-item loading)
    **kwargs):
    "Train a ResNet on CIFAR-10/100 with CDS or a baseline, print the last and best validation metrics as a table, export the model"
    run = RecipeRun('cifar', **kwargs)
    if dataset not in ('cifar10', 'cifar100'): raise ValueError(f"--dataset {dataset}: pick cifar10 or cifar100")
    size = 16 if run.smoke else 32
    if run.smoke: epochs, bs = 1, 8
    views = reference_views('cifar', size, cutout=cutout*size//32)
    path = run.data_path(dataset, 'test', smoke_size=size)
    dls = (folder_tensor_dls(path, 'test', bs, views.batch_tfms, num_workers=run.workers) if in_memory else ImageDataLoaders.from_folder(
           path, valid='test', bs=bs, num_workers=run.workers, item_tfms=views.item_tfms, batch_tfms=views.batch_tfms))
    model = cifar_resnet(arch, dls.c) if cifar_stem else get_arch(arch)(num_classes=dls.c)
    cbs = method_callbacks(method, view2_tfms=views.view2_tfms, cross_rank=run.cross_rank) + [BestMetrics()]
    learn = run.learner(reference_learner(dls, model, run.wd, accuracy, cbs))
    with run.training(learn):
        if schedule == 'reference': learn.fit(epochs, lr, cbs=ParamScheduler({'lr': step_schedule(lr)}))
        else: learn.fit_one_cycle(epochs, lr)
        run.report(learn, dict(dataset=dataset, arch=arch + (' (CIFAR stem)' if cifar_stem else ''), method=method, schedule=schedule,
                               epochs=epochs), paper_top1(dataset, arch, method=method) if cifar_stem else None)  # the paper's: CIFAR stem
    run.finish(learn)
