"""Quick start: the same small CNN with and without CDS on scikit-learn's digits (10 % of the labels).

Deviations from the paper: a 4-stage CNN at 16x16 instead of a ResNet on CIFAR/ImageNet, Adam with
one-cycle instead of SGD over 300 epochs, and a milder view 2 (no flip: digits are not symmetric).
One seed is a noisy comparison; `bench/compare.py` pairs many.
"""
import time, warnings
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

def small_cnn(n_in:int=1, n_out:int=10)->nn.Sequential:
    "Four conv stages (32-64-128-256 channels, stride 2 from the second), global pooling, a linear classifier"
    return nn.Sequential(ConvLayer(n_in, 32), ConvLayer(32, 32), ConvLayer(32, 64, stride=2), ConvLayer(64, 64),
                         ConvLayer(64, 128, stride=2), ConvLayer(128, 128), ConvLayer(128, 256, stride=2), ConvLayer(256, 256),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, n_out))

def train(cds:bool, seed:int, epochs:int, lr:float, label_fraction:float, bs:int, size:int=16):
    "Train `small_cnn` with or without `CDSCallback`; returns the learner, its accuracy and time"
    set_seed(seed, reproducible=True)
    dls = digits_dls(size=size, label_fraction=label_fraction, seed=seed, bs=bs)
    cbs = [CDSCallback(view2_tfms=simclr_tfms(n_channels=1, flip=False), verbose=False)] if cds else []
    learn = Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    start = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    secs = time.time() - start
    with learn.no_bar(): acc = float(learn.validate()[1])
    return learn, acc, secs

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
    warnings.filterwarnings('ignore')
    rows = []
    for cds in (False, True):
        learn, acc, secs = train(cds, seed, epochs, lr, label_fraction, bs, size)
        rows.append(('CDS' if cds else 'baseline', acc, secs))
    print(f"digits, {label_fraction:.0%} of the training labels, {epochs} epochs, seed {seed}")
    print(f"{'method':<10}{'accuracy':>10}{'time (s)':>10}")
    for nm,acc,secs in rows: print(f"{nm:<10}{acc*100:>9.2f}%{secs:>10.1f}")
    if export:
        learn.export(Path(export).absolute())
        print(f"exported the CDS model to {Path(export).absolute()} (a plain Learner: load_learner needs no fastai_cds)")
