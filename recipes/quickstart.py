"""Quick start: the same small CNN with and without CDS on scikit-learn's digits (10 % of the labels).

Deviations from the paper: a 4-stage CNN (`fastai_cds.architectures.small_cnn`) at 16x16 instead of a ResNet on
CIFAR/ImageNet, Adam with one-cycle instead of SGD over 300 epochs, and a milder view 2 (no flip: digits are not
symmetric). One seed is a noisy comparison; `bench/compare.py` pairs many.
"""
import warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from fastai_cds.recipe import *  # before torch: it lets idle CPU threads sleep (OMP_WAIT_POLICY)
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

@call_parse
@recipe_options(but='path workers pretrained')
def main(
    epochs:int=30, # training epochs for each model
    lr:float=3e-3, # one-cycle maximum learning rate
    label_fraction:float=0.1, # fraction of the training labels kept (stratified)
    bs:int=32, # batch size
    size:int=16, # image size (the digits are 8x8)
    **kwargs):
    "Train a small CNN on digits with and without CDS, print a table, export the CDS model"
    run = RecipeRun('quickstart', **kwargs)
    if run.smoke: epochs = 1
    for method in ('base', 'cds'):
        set_seed(run.seed)  # both models: the same split, initialisation and augmentation
        dls = digits_dls(size=size, label_fraction=label_fraction, seed=run.seed, bs=bs)
        v2 = simclr_tfms(n_channels=1, flip=False)  # no flip: digits are not mirror-symmetric
        cbs = [CDSCallback(view2_tfms=v2, cross_rank=run.cross_rank, verbose=False)] if method == 'cds' else []
        learn = run.learner(Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs, wd=run.wd),
                            tag=method, first=method == 'base')
        with run.training(learn), learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(epochs, lr)
            run.report(learn, dict(dataset='digits', labels=f'{label_fraction:.0%}', method={'base': 'baseline', 'cds': 'CDS'}[method],
                                   epochs=epochs))
    run.finish(learn, 'CDS model')
