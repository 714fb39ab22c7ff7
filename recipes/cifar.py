"""CIFAR-10 / CIFAR-100 with contrastive deep supervision, or a baseline, in the reference code's setting (Tables 1 and 2).

The reference setting (CIFAR/train.py) is the default: ResNet18 with a CIFAR stem (3x3 stride-1 first conv, no max-pool),
CDS with SupCon heads (weight 0.1, tau 0.07) initialised as the reference's, the reference's two views
(`reference_views('cifar')`: view 1 = pad 4 with grey + random crop, flip, Cutout 16x16 before normalisation; view 2 =
pad 4 + crop, flip, grouped colour jitter p=0.8, grayscale 0.2; each an independent crop of the raw image, made per
image on the device), the reference's mean and std, SGD momentum 0.9, weight decay 5e-4 on every parameter, lr 0.1,
batch 128, 300 epochs, lr /10 at epochs 90, 180 and 280, and the best test accuracy over the epochs reported beside the last:

    python recipes/cifar.py --dataset cifar100 --method cds      # paper: 80.84 % top-1 (baseline 77.45 %)
    python recipes/cifar.py --dataset cifar10 --arch senet50 --method dks        # any row of Tables 1-2: paper 95.72 %

`--arch` takes every network of the paper's Tables 1, 2 and 8 (`CIFAR_ARCHS`), each with the stem of its CIFAR version
(`cifar_model`). `--save-model FILE` saves the trained model with its heads (`learn.save`): a CDS teacher for
`recipes/distill.py --teacher-file FILE`.

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
    arch:str='resnet18', # a network of Tables 1, 2 and 8 (CIFAR stem): resnet18/50/101, resnext50/101, wrn50/101, senet18/50/101, ...
    method:str='cds', # base (CE only), dsn, dks, dhm (deep-supervision baselines), cds (SupCon heads, the paper's), cds-simclr
    schedule:str='reference', # reference: SGD, lr /10 at epochs 90, 180, 280 of 300 (scaled to --epochs); one-cycle: fastai's fit_one_cycle
    epochs:int=300, # training epochs
    bs:int=128, # batch size (CDS also runs a second view of each image)
    lr:float=0.1, # learning rate (one-cycle: the peak)
    cutout:int=16, # side of view 1's Cutout square in pixels (0: no Cutout)
    in_memory:Switch=True, # decode the images once (by --workers processes), batches index them (--no-in-memory: fastai's per-item loading)
    save_model:str='', # save the trained model with its heads (`learn.save`) to this .pth file: a teacher for distill.py --teacher-file
    **kwargs):
    "Train a network of the paper on CIFAR-10/100 with CDS or a baseline, print the last and best validation metrics as a table, export it"
    run = RecipeRun('cifar', **kwargs)
    if dataset not in ('cifar10', 'cifar100'): raise ValueError(f"--dataset {dataset}: pick cifar10 or cifar100")
    n_out = 10 if run.smoke or dataset == 'cifar10' else 100
    model = cifar_model(arch, n_out)  # an unknown --arch: a message listing the choices, before any data
    size = 16 if run.smoke else 32
    if run.smoke: epochs, bs = 1, 8
    views = reference_views('cifar', size, cutout=cutout*size//32)
    path = run.data_path(dataset, 'test', smoke_size=size)
    dls = (folder_tensor_dls(path, 'test', bs, views.batch_tfms, num_workers=run.workers) if in_memory else ImageDataLoaders.from_folder(
           path, valid='test', bs=bs, num_workers=run.workers, item_tfms=views.item_tfms, batch_tfms=views.batch_tfms))
    if dls.c != n_out: raise ValueError(f"--path {path}: {dls.c} classes, but {dataset} has {n_out}")
    cbs = method_callbacks(method, view2_tfms=views.view2_tfms, cross_rank=run.cross_rank) + [BestMetrics()]
    learn = run.learner(reference_learner(dls, model, run.wd, accuracy, cbs))
    with run.training(learn):
        if schedule == 'reference': learn.fit(epochs, lr, cbs=ParamScheduler({'lr': step_schedule(lr)}))
        else: learn.fit_one_cycle(epochs, lr)
        run.report(learn, dict(dataset=dataset, arch=arch, method=method, schedule=schedule, epochs=epochs),
                   paper_top1(dataset, arch, method=method))
    if save_model:  # the model with its heads (CDS), in the file's own folder (fastai's `save` makes its `model_dir`)
        learn.model_dir = Path(save_model).absolute().parent
        learn.save(Path(save_model).name.removesuffix('.pth'), with_opt=False)
    run.finish(learn)
