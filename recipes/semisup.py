"""Semi-supervised contrastive deep supervision (paper eq. 6): a labelled fraction of the data plus the unlabelled rest.

`--method` picks what the model learns from:
  base  the labelled part only, plain training
  cds   the labelled part only, with CDS
  semi  the labelled part with CDS, plus the unlabelled rest through the contrastive term only
        (`CDSCallback(unlabelled=udl)`: each unlabelled image's two views are each other's only positives)
The model is then exported as a plain model (no heads inside).

Deviations from the paper: scikit-learn's digits at 16x16 and the quickstart's small CNN instead of a ResNet18 on
CIFAR-10/100; Adam with one-cycle over a few epochs instead of SGD over 300; view 2 without flip on digits.

    python recipes/semisup.py                              # digits, 10 % of the labels, semi
    python recipes/semisup.py --method base --label-fraction 0.4
    python recipes/semisup.py --dataset cifar10 --arch resnet18 --size 32
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
    method:str='semi', # base (labelled part, plain), cds (labelled part, CDS) or semi (labelled part + unlabelled rest, CDS)
    dataset:str='digits', # digits (embedded), cifar10, cifar100 or a fastai URLs name in lower case (--path: a local copy)
    label_fraction:float=0.1, # stratified fraction of the training items that keep their label; the rest is unlabelled
    arch:str='cnn', # cnn (the quickstart's small_cnn) or a torchvision name (resnet18, ...)
    epochs:int=30, # training epochs (an epoch is one pass over the labelled part)
    lr:float=3e-3, # one-cycle maximum learning rate (Adam)
    bs:int=32, # labelled batch size
    unlabelled_ratio:float=1., # unlabelled batch size / labelled batch size (semi)
    weight:float=0.1, # lambda1: weight of every head's contrastive loss (cds, semi)
    size:int=16, # image size
    **kwargs):
    "Train on a labelled fraction (and the unlabelled rest) by `method`; print the accuracy; export the model"
    run = RecipeRun('semisup', **kwargs)
    if method not in ('base', 'cds', 'semi'): raise ValueError(f"--method {method}: pick base, cds or semi")
    if run.smoke: dataset, epochs, bs, label_fraction = 'digits', 1, 16, min(label_fraction, 0.05)
    dls, udl = labelled_data(dataset, size, bs, label_fraction, run.seed, 0.05 if run.smoke else 0.2, max(1, round(unlabelled_ratio*bs)),
                             run.path, num_workers=run.workers)
    v2 = simclr_tfms(n_channels=1, flip=False) if dataset == 'digits' else None  # None: the default view 2
    cds = CDSCallback(weight=weight, view2_tfms=v2, cross_rank=run.cross_rank, unlabelled=udl if method == 'semi' else None)
    learn = run.learner(arch_learner(arch, dls, ([] if method == 'base' else [cds]) + [BestMetrics()], run.pretrained, wd=run.wd))
    with run.training(learn):
        learn.fit_one_cycle(epochs, lr)
        unlabelled = f"{len(udl.dataset) if udl else 0} unlabelled" + ('' if method == 'semi' else ' (not used)')
        run.report(learn, dict(dataset=dataset, labels=f"{label_fraction:.0%}: {len(dls.train_ds)} labelled, {unlabelled}", arch=arch,
                               method=method, epochs=epochs))
    run.finish(learn)
