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
    python recipes/semisup.py --dataset CIFAR --arch resnet18 --size 32
"""
import tempfile, warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.recipe import *
from fastai_cds.parallel import rank0_print

@call_parse
def main(
    method:str='semi', # base (labelled part, plain), cds (labelled part, CDS) or semi (labelled part + unlabelled rest, CDS)
    dataset:str='digits', # digits (embedded, offline), a fastai URLs name (downloaded: CIFAR, IMAGENETTE_160) or a folder
    label_fraction:float=0.1, # stratified fraction of the training items that keep their label; the rest is unlabelled
    arch:str='cnn', # cnn (the quickstart's small_cnn) or a torchvision name (resnet18, ...)
    epochs:int=30, # training epochs (an epoch is one pass over the labelled part)
    lr:float=3e-3, # one-cycle maximum learning rate (Adam)
    bs:int=32, # labelled batch size
    unlabelled_ratio:float=1., # unlabelled batch size / labelled batch size (semi)
    weight:float=0.1, # lambda1: weight of every head's contrastive loss (cds, semi)
    size:int=16, # image size
    seed:int=0, # fixes the splits, the initialisation and the augmentation
    pretrained:bool=False, # ImageNet weights for torchvision architectures (downloads them)
    fp16:bool=False, # mixed precision: bfloat16 where the device supports it (CPU too), else float16 (fastai's to_fp16)
    channels_last:bool=False, # channels-last memory format (fastai's ChannelsLast callback)
    compile:bool=False, # torch.compile the model with its heads (CompileCallback; the export is the plain model)
    export:str='semisup.pkl', # where to export the model ('' to skip)
    sync_bn:bool=False, # under N processes on GPUs: BatchNorm statistics over all processes' batches (nn.SyncBatchNorm)
    cross_rank:bool=False, # under N processes: the contrastive loss contrasts each process's images with every process's (CDS methods)
    checkpoint:str='checkpoint.pth', # the file of --checkpoint-every and --resume
    checkpoint_every:int=0, # save the state of training every N epochs and after the last (0: never)
    resume:bool=False, # continue the run saved in --checkpoint: the epochs done are skipped, the schedule goes on where it stopped
    smoke:bool=False, # a tiny run of the same code path: 1 epoch on a few digits; exports to a temporary folder unless --export is given
):
    "Train on a labelled fraction (and the unlabelled rest) by `method`; print the accuracy; export the model"
    if method not in ('base', 'cds', 'semi'): raise CliError(f"--method {method}: pick base, cds or semi")
    valid_pct = 0.05 if smoke else 0.2
    if smoke:
        epochs, bs = 1, 16
        if dataset == 'digits': label_fraction = min(label_fraction, 0.05)
        if export == 'semisup.pkl': export = str(Path(tempfile.mkdtemp())/export)  # the default goes to a temporary folder
    init_distributed()  # launched on N processes (torchrun, accelerate launch): join them, this process's GPU first
    set_seed(seed, reproducible=True)
    dls, udl = labelled_data(dataset, size, bs, label_fraction, seed, valid_pct, max(1, round(unlabelled_ratio*bs)))
    v2 = simclr_tfms(n_channels=1, flip=False) if dataset == 'digits' else None  # None: the default view 2
    cbs = [] if method == 'base' else [CDSCallback(weight=weight, view2_tfms=v2, cross_rank=cross_rank, unlabelled=udl if method == 'semi' else None)]
    learn = arch_learner(arch, dls, cbs + [BestMetrics()] + checkpointing(checkpoint, checkpoint_every, resume), pretrained)
    speedups(learn, fp16, channels_last, compile)
    with distributed(learn, sync_bn):
        learn.fit_one_cycle(epochs, lr)
        with learn.no_bar(): acc = float(learn.validate()[1])
    rank0_print(f"{dataset}, {label_fraction:.0%} of the training labels ({len(dls.train_ds)} labelled, {len(udl.dataset) if udl else 0} unlabelled "
          f"images{'' if method == 'semi' else ', not used'}): {arch} ({method}) {acc*100:.2f}%, best {learn.best_metrics.best*100:.2f}% (epoch {learn.best_metrics.best_at+1})")
    if export: export_and_check(learn, export)
