"""Quick start: the same small CNN with and without CDS on scikit-learn's digits (10 % of the labels).

Deviations from the paper: a 4-stage CNN (`fastai_cds.architectures.small_cnn`) at 16x16 instead of a ResNet on
CIFAR/ImageNet, Adam with one-cycle instead of SGD over 300 epochs, and a milder view 2 (no flip: digits are not
symmetric). One seed is a noisy comparison; `bench/compare.py` pairs many.
"""
import time, warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch.jit._script')  # torch.jit.script is deprecated: fastai uses it at import
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.recipe import *
from fastai_cds.parallel import rank0_print

@call_parse
def main(
    epochs:int=30, # training epochs for each model
    lr:float=3e-3, # one-cycle maximum learning rate
    label_fraction:float=0.1, # fraction of the training labels kept (stratified)
    seed:int=0, # fixes the split, the initialisation and the augmentation, for both models
    bs:int=32, # batch size
    size:int=16, # image size (the digits are 8x8)
    export:str='quickstart_cds.pkl', # where to export the CDS model ('' to skip)
    checkpoint:str='checkpoint.pth', # the file of --checkpoint-every and --resume: FILE.base.pth and FILE.cds.pth
    checkpoint_every:int=0, # save the state of training every N epochs and after the last (0: never)
    resume:bool=False, # continue the run saved in --checkpoint: the epochs done are skipped, the schedule goes on where it stopped
):
    "Train a small CNN on digits with and without CDS, print a table, export the CDS model"
    init_distributed()  # launched on N processes (torchrun, accelerate launch): join them, this process's GPU first
    rank0_print(f"digits, {label_fraction:.0%} of the training labels, {epochs} epochs, seed {seed}\n{'method':<10}{'accuracy':>10}{'time (s)':>10}")
    for method in ('base', 'cds'):
        set_seed(seed, reproducible=True)
        dls = digits_dls(size=size, label_fraction=label_fraction, seed=seed, bs=bs)
        learn = Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                        cbs=method_callbacks(method, view2_tfms=simclr_tfms(n_channels=1, flip=False), verbose=False)
                            + checkpointing(checkpoint, checkpoint_every, resume, tag=method, first=method == 'base'))
        start = time.time()
        with distributed(learn), learn.no_bar():
            with learn.no_logging(): learn.fit_one_cycle(epochs, lr)
            acc = float(learn.validate()[1])
        rank0_print(f"{'CDS' if method == 'cds' else 'baseline':<10}{acc*100:>9.2f}%{time.time()-start:>10.1f}")
    if export: export_and_check(learn, export, 'CDS model')
