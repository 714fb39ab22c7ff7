"""Quick start: the same small CNN with and without CDS on scikit-learn's digits (10 % of the labels).

Deviations from the paper: a 4-stage CNN (`fastai_cds.models.small_cnn`) at 16x16 instead of a ResNet on
CIFAR/ImageNet, Adam with one-cycle instead of SGD over 300 epochs, and a milder view 2 (no flip: digits are not
symmetric). One seed is a noisy comparison; `bench/compare.py` pairs many.
"""
import time, warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch.jit._script')  # torch.jit.script is deprecated: fastai uses it at import
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

@call_parse
def main(
    epochs:int=30, # training epochs for each model
    lr:float=3e-3, # one-cycle maximum learning rate
    label_fraction:float=0.1, # fraction of the training labels kept (stratified)
    seed:int=0, # fixes the split, the initialisation and the augmentation, for both models
    bs:int=32, # batch size
    size:int=16, # image size (the digits are 8x8)
    export:str='quickstart_cds.pkl', # where to export the CDS model ('' to skip)
):
    "Train a small CNN on digits with and without CDS, print a table, export the CDS model"
    print(f"digits, {label_fraction:.0%} of the training labels, {epochs} epochs, seed {seed}\n{'method':<10}{'accuracy':>10}{'time (s)':>10}")
    for method in ('base', 'cds'):
        set_seed(seed, reproducible=True)
        dls = digits_dls(size=size, label_fraction=label_fraction, seed=seed, bs=bs)
        learn = Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                        cbs=method_callbacks(method, view2_tfms=simclr_tfms(n_channels=1, flip=False), verbose=False))
        start = time.time()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
        with learn.no_bar(): acc = float(learn.validate()[1])
        print(f"{'CDS' if method == 'cds' else 'baseline':<10}{acc*100:>9.2f}%{time.time()-start:>10.1f}")
    if export: export_and_check(learn, export, 'CDS model')
