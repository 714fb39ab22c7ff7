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
import sys, tempfile, warnings
from pathlib import Path
import torchvision
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import small_cnn  # noqa: E402
from _common import folder_dls, get_path, print_export  # noqa: E402,F401  (get_path: tests call it)

METHODS = ('base', 'cds', 'semi')

def get_data(dataset:str, size:int, bs:int, label_fraction:float, seed:int, unlabelled_bs:int, valid_pct:float=0.2):
    "(labelled DataLoaders, unlabelled DataLoader): digits (embedded), a fastai `URLs` name or a folder with train/ and valid/"
    if dataset == 'digits':
        dls, udl = digits_dls(size=size, bs=bs, label_fraction=label_fraction, seed=seed, valid_pct=valid_pct, unlabelled=True)
        return dls, udl.new(bs=unlabelled_bs)
    dls = folder_dls(dataset, size, bs, seed)
    return split_labelled(dls, label_fraction, seed, unlabelled_bs)

def make_learner(arch:str, dls:DataLoaders, cbs:list, pretrained:bool=False)->Learner:
    "'cnn' (the quickstart's small CNN) or a torchvision model name"
    n_in = dls.one_batch()[0].shape[1]
    if arch == 'cnn': return Learner(dls, small_cnn(n_in, dls.c), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    return vision_learner(dls, getattr(torchvision.models, arch), n_in=n_in, pretrained=pretrained, metrics=accuracy, cbs=cbs)

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
    channels_last:bool=False, # channels-last memory format (`to_channelslast`)
    export:str='semisup.pkl', # where to export the model ('' to skip)
    threads:int=0, # torch intra-op threads (0: torch's default; 1 is often faster for small models on a busy CPU)
    smoke:bool=False, # a tiny fast run of the same code path: 1 epoch on a few digits, 1 thread; exports to a temporary folder unless --export is given
):
    "Train on a labelled fraction (and the unlabelled rest) by `method`; print the accuracy; export the model"
    if method not in METHODS: raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    warnings.filterwarnings('ignore')
    valid_pct = 0.2
    if smoke:
        epochs, bs, threads, valid_pct = 1, 16, 1, 0.05
        if dataset == 'digits': label_fraction = min(label_fraction, 0.05)
        if export == 'semisup.pkl': export = str(Path(tempfile.mkdtemp())/export)  # the default goes to a temporary folder
    if threads: torch.set_num_threads(threads)
    set_seed(seed, reproducible=True)
    v2 = simclr_tfms(n_channels=1, flip=False) if dataset == 'digits' else None  # None: the reference view 2

    # ---- what a user writes: data, learner, fit, export
    dls, udl = get_data(dataset, size, bs, label_fraction, seed, max(1, round(unlabelled_ratio*bs)), valid_pct)
    cbs = {'base': [], 'cds': [CDSCallback(weight=weight, view2_tfms=v2)],
           'semi': [CDSCallback(weight=weight, view2_tfms=v2, unlabelled=udl)]}[method]
    learn = make_learner(arch, dls, cbs, pretrained)
    if fp16: to_mixed_precision(learn)
    if channels_last: learn.to_channelslast(use_amp=False)
    learn.fit_one_cycle(epochs, lr)
    if export: learn.export(Path(export).absolute())

    # ---- report
    with learn.no_bar(): acc = float(learn.validate()[1])
    print(f"{dataset}, {label_fraction:.0%} of the training labels ({len(dls.train_ds)} labelled, {len(udl.dataset)} unlabelled "
          f"images{'' if method == 'semi' else ', not used'}): {arch} ({method}) {acc*100:.2f}%")
    if export: print_export(export, 'model')
