"""Semi-supervised contrastive deep supervision (paper eq. 6): a labelled fraction of the data plus the unlabelled rest.

`--method` picks what the model learns from:
  base  the labelled part only, plain training
  cds   the labelled part only, with CDS
  semi  the labelled part with CDS, plus the unlabelled rest through the contrastive term only
        (`CDSCallback(unlabelled=udl)`: each unlabelled image's two views are each other's only positives)
The model is then exported as a plain model (no heads inside).

On CIFAR-10/100 (the paper's setting: ResNet18, 10-40 % of the labels) the training is recipes/cifar.py's reference
setting: `cifar_model` (CIFAR stem, one fc), `reference_views('cifar')`, SGD momentum 0.9, weight decay 5e-4 on every
parameter, lr 0.1, batch 128, 300 epochs (an epoch is one pass over the labelled part), lr /10 at epochs 90, 180 and 280,
the best and the last top-1 reported. The labelled part is a stratified fraction of the training set, drawn with --seed;
the rest is the unlabelled stream (batches of --unlabelled-ratio x --bs), and the table gives both counts and the seed.
The reference code has no semi-supervised script and the paper gives its numbers as a plot: no paper number is printed.

    python recipes/semisup.py --dataset cifar100 --label-fraction 0.1 --method semi
    python recipes/semisup.py --dataset cifar10 --label-fraction 0.4 --method base

On digits (the default, a quick departure): scikit-learn's digits at 16x16 and the quickstart's small CNN, Adam with
one-cycle over 30 epochs, batch 32, view 2 without flip (digits are not mirror-symmetric):

    python recipes/semisup.py                              # digits, 10 % of the labels, semi
"""
import warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from fastai_cds.recipe import *  # before torch: it lets idle CPU threads sleep (OMP_WAIT_POLICY)
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

@call_parse
@recipe_options(wd=None)
def main(
    method:str='semi', # base (labelled part, plain), cds (labelled part, CDS) or semi (labelled part + unlabelled rest, CDS)
    dataset:str='digits', # digits (embedded), cifar10, cifar100 (the reference setting), or a fastai URLs name in lower case (--path)
    label_fraction:float=0.1, # stratified fraction of the training items that keep their label; the rest is unlabelled
    arch:str='', # cifar: a `CIFAR_ARCHS` name (resnet18, the paper's); others: cnn (the quickstart's small_cnn) or a torchvision name
    epochs:int=None, # training epochs, each one pass over the labelled part (cifar: 300; others: 30)
    lr:float=None, # learning rate (cifar: 0.1, SGD, step schedule; others: 3e-3, Adam one-cycle maximum)
    bs:int=None, # labelled batch size (cifar: 128; others: 32)
    unlabelled_ratio:float=1., # unlabelled batch size / labelled batch size (semi)
    weight:float=0.1, # lambda1: weight of every head's contrastive loss (cds, semi)
    size:int=None, # image size (cifar: 32; others: 16)
    **kwargs):
    "Train on a labelled fraction (and the unlabelled rest) by `method`; print the accuracy; export the model"
    run = RecipeRun('semisup', **kwargs)
    if method not in ('base', 'cds', 'semi'): raise ValueError(f"--method {method}: pick base, cds or semi")
    reference = dataset in ('cifar10', 'cifar100')
    arch, epochs, lr, bs, size = (arch or ('resnet18' if reference else 'cnn'), epochs or (300 if reference else 30),
                                  lr or (0.1 if reference else 3e-3), bs or (128 if reference else 32), size or (32 if reference else 16))
    wd = (5e-4 if reference else 1e-2) if run.wd is None else run.wd
    if run.smoke: epochs, bs, size, label_fraction = 1, 8 if reference else 16, 16, min(label_fraction, 0.05)
    if run.smoke and not reference: dataset = 'digits'
    u_bs = max(1, round(unlabelled_ratio*bs))
    if reference:
        make_dls, v2, model, check, fit = reference_setting('cifar', dataset, run, size, bs)
        check(arch)  # an unknown --arch: the choices, before any data
        dls, udl = split_labelled(make_dls(), label_fraction, run.seed, u_bs)
        new_learner = lambda cbs: reference_learner(dls, model(arch, dls.c), wd, accuracy, cbs)
    else:
        dls, udl = labelled_data(dataset, size, bs, label_fraction, run.seed, 0.05 if run.smoke else 0.2, u_bs, run.path,
                                 num_workers=run.workers)
        v2 = simclr_tfms(n_channels=1, flip=False) if dataset == 'digits' else None  # None: the default view 2
        new_learner = lambda cbs: arch_learner(arch, dls, cbs, run.pretrained, wd=wd)
        fit = lambda learn, epochs, lr: learn.fit_one_cycle(epochs, lr)
    cds = CDSCallback(weight=weight, view2_tfms=v2, cross_rank=run.cross_rank, unlabelled=udl if method == 'semi' else None)
    learn = run.learner(new_learner(([] if method == 'base' else [cds]) + [BestMetrics()]))
    with run.training(learn):
        fit(learn, epochs, lr)
        unlabelled = f"{len(udl.dataset) if udl else 0} unlabelled" + ('' if method == 'semi' else ' (not used)')
        run.report(learn, dict(dataset=dataset, labels=f"{label_fraction:.0%}: {len(dls.train_ds)} labelled, {unlabelled}, seed {run.seed}",
                               arch=arch, method=method, epochs=epochs))
    run.finish(learn)
