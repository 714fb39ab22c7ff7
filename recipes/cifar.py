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
import argparse, time, warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from typing import Annotated
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.recipe import *

Switch = Annotated[bool, {'action': argparse.BooleanOptionalAction}]  # --flag / --no-flag
SOURCES = {'cifar10': ('CIFAR-10', URLs.CIFAR), 'cifar100': ('CIFAR-100', URLs.CIFAR_100)}

@call_parse
def main(
    dataset:str='cifar100', # cifar10 or cifar100
    path:str=None, # a local copy instead of fastai's download: a folder with train/ and test/, one subfolder per class
    arch:str='resnet18', # a torchvision ResNet-family architecture: resnet18, resnet50, wide_resnet50_2, resnext50_32x4d, ...
    cifar_stem:Switch=True, # 3x3 stride-1 first conv and no max-pool, as the reference's ResNet (--no-cifar-stem: torchvision's)
    method:str='cds', # base (CE only), dsn, dks, dhm (deep-supervision baselines), cds (SupCon heads, the paper's), cds-simclr
    schedule:str='reference', # reference: SGD, lr /10 at epochs 90, 180, 280 of 300 (scaled to --epochs); one-cycle: fastai's fit_one_cycle
    epochs:int=300, # training epochs
    bs:int=128, # batch size (CDS also runs a second view of each image)
    lr:float=0.1, # learning rate (one-cycle: the peak)
    wd:float=5e-4, # weight decay (L2, on every parameter, as torch SGD)
    cutout:int=16, # side of view 1's Cutout square in pixels (0: no Cutout)
    fp16:bool=False, # mixed precision: bfloat16 where the device supports it, else float16 (fastai's to_fp16)
    channels_last:bool=False, # channels-last memory format (fastai's ChannelsLast callback)
    compile:bool=False, # torch.compile the model with its heads (CompileCallback; the export is the plain model)
    export:str=None, # where to export the trained model: a plain fastai Learner, `load_learner` needs no fastai_cds
    seed:int=None, # seed of Python's, NumPy's and torch's random generators (None: not fixed)
    workers:int=None, # DataLoader worker processes (None: fastai's default; --in-memory: the processes decoding the images, batches are made in the main process)
    in_memory:Switch=True, # decode the images once into one uint8 tensor, make batches by indexing it (--no-in-memory: fastai's per-item loading)
    sync_bn:bool=False, # under N processes on GPUs: BatchNorm statistics over all processes' batches (nn.SyncBatchNorm)
    cross_rank:bool=False, # under N processes: the contrastive loss contrasts each process's images with every process's (CDS methods)
    checkpoint:str='checkpoint.pth', # the file of --checkpoint-every and --resume
    checkpoint_every:int=0, # save the state of training every N epochs and after the last (0: never)
    resume:bool=False, # continue the run saved in --checkpoint: the epochs done are skipped, the schedule goes on where it stopped
    smoke:bool=False, # tiny run on 16x16 digit images written on the spot (1 epoch, batch 8), export included: checks the whole path
):
    "Train a ResNet on CIFAR-10/100 with CDS or a baseline, print the last and best validation metrics as a table, export the model"
    if dataset not in SOURCES: raise CliError(f"--dataset {dataset}: pick cifar10 or cifar100")
    size = 16 if smoke else 32
    views = reference_views('cifar', size, cutout=cutout*size//32)
    init_distributed()  # launched on N processes (torchrun, accelerate launch): join them, this process's GPU first
    cbs = method_callbacks(method, view2_tfms=views.view2_tfms, cross_rank=cross_rank) + [BestMetrics()]
    if seed is not None: set_seed(seed)
    if smoke: path, epochs, bs, workers, export = smoke_folder(size, 'test'), 1, 8, 0, export or 'smoke.pkl'
    path = dataset_path(*SOURCES[dataset], path, layout='train/ and test/ folders, one subfolder per class')
    dls = (folder_tensor_dls(path, 'test', bs, views.batch_tfms, num_workers=workers) if in_memory else
           ImageDataLoaders.from_folder(path, valid='test', bs=bs, num_workers=workers, item_tfms=views.item_tfms, batch_tfms=views.batch_tfms))
    model = cifar_resnet(arch, dls.c) if cifar_stem else get_arch(arch)(num_classes=dls.c)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.9, decouple_wd=False), wd=wd, wd_bn_bias=True,
                    metrics=accuracy, cbs=cbs + checkpointing(checkpoint, checkpoint_every, resume))
    speedups(learn, fp16, channels_last, compile)
    start = time.perf_counter()
    with distributed(learn, sync_bn):
        if schedule == 'reference': learn.fit(epochs, lr, cbs=ParamScheduler({'lr': step_schedule(lr)}))
        else: learn.fit_one_cycle(epochs, lr)
        report(learn, dict(dataset='digits (smoke)' if smoke else dataset, arch=arch + (' (CIFAR stem)' if cifar_stem else ''), method=method,
                           schedule=schedule, epochs=epochs), None if smoke else paper_top1(dataset, arch, method=method), time.perf_counter() - start)
    if export: export_and_check(learn, path/export if smoke and export == 'smoke.pkl' else export)
