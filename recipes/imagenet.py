"""ImageNet with contrastive deep supervision, or a baseline, in the reference code's setting (the paper's Table 2).

The reference setting (ImageNet/Contrastive_Deep_Supervision/main.py) is the default: a torchvision ResNet18 (or 50),
CDS with SupCon heads (weight 0.1, tau 0.07) on the 4 stages, the reference's two views (`reference_views('imagenet')`:
view 1 = RandomResizedCrop(224) + flip, view 2 = RandomResizedCrop(224, scale 0.2-1) + flip + grouped colour jitter
p=0.8 + grayscale 0.2, each an independent crop of the image, made per image on the device), validation on the centre
224x224 crop of images resized to 256, SGD momentum 0.9, lr 0.1, weight decay 1e-4 on every parameter, batch 256, 90
epochs, lr /10 every 30 epochs; the last and the best top-1 and top-5 are reported.

    python recipes/imagenet.py --path ~/data/imagenet --arch resnet18       # paper: 72.85 % top-1 (baseline 69.21 %)

`--reference-stem` removes the max-pool as the reference's ImageNet ResNet does (it defines one but never calls it),
so the stages run at twice torchvision's resolution, about 4x the compute: the paper's numbers come from that network.
`--bs` is the batch of each process: on N GPUs (`accelerate launch` / `torchrun`, see the README) pass --bs 256/N.
ImageNet cannot be downloaded by fastai: pass a local copy with train/ and val/, one subfolder per class.
What still differs from the reference: recipes/README.md.
"""
import argparse, time, warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from typing import Annotated
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.recipe import *

Switch = Annotated[bool, {'action': argparse.BooleanOptionalAction}]  # --flag / --no-flag

@call_parse
def main(
    path:str=None, # an ImageNet-style folder: train/ and val/, one subfolder per class
    arch:str='resnet18', # a torchvision architecture: resnet18, resnet50, ...
    reference_stem:Switch=False, # no max-pool, as the reference's ImageNet ResNet (stages at twice the resolution, ~4x compute)
    method:str='cds', # base (CE only), dsn, dks, dhm (deep-supervision baselines), cds (SupCon heads, the paper's), cds-simclr
    epochs:int=90, # training epochs; lr /10 after 1/3 and 2/3 of them (30 and 60 of 90)
    bs:int=256, # batch size of each process (CDS also runs a second view of each image)
    lr:float=0.1, # learning rate
    wd:float=1e-4, # weight decay (L2, on every parameter, as torch SGD)
    size:int=224, # training and validation image size (items are presized to 8/7 of it)
    fp16:bool=False, # mixed precision: bfloat16 where the device supports it, else float16 (fastai's to_fp16)
    channels_last:bool=False, # channels-last memory format (fastai's ChannelsLast callback)
    compile:bool=False, # torch.compile the model with its heads (CompileCallback; the export is the plain model)
    export:str=None, # where to export the trained model: a plain fastai Learner, `load_learner` needs no fastai_cds
    seed:int=None, # seed of Python's, NumPy's and torch's random generators (None: not fixed)
    workers:int=None, # DataLoader worker processes (None: fastai's default)
    sync_bn:bool=False, # under N processes on GPUs: BatchNorm statistics over all processes' batches (nn.SyncBatchNorm)
    cross_rank:bool=False, # under N processes: the contrastive loss contrasts each process's images with every process's (CDS methods)
    checkpoint:str='checkpoint.pth', # the file of --checkpoint-every and --resume
    checkpoint_every:int=0, # save the state of training every N epochs and after the last (0: never)
    resume:bool=False, # continue the run saved in --checkpoint: the epochs done are skipped, the schedule goes on where it stopped
    smoke:bool=False, # tiny run on 32x32 digit images written on the spot (1 epoch, batch 8), export included: checks the whole path
):
    "Train a ResNet on ImageNet with CDS or a baseline, print the last and best top-1/top-5 as a table, export the model"
    size = 32 if smoke else size
    views = reference_views('imagenet', size)
    init_distributed()  # launched on N processes (torchrun, accelerate launch): join them, this process's GPU first
    cbs = method_callbacks(method, view2_tfms=views.view2_tfms, cross_rank=cross_rank) + [BestMetrics()]
    if seed is not None: set_seed(seed)
    if smoke: path, epochs, bs, workers, export = smoke_folder(40, 'val'), 1, 8, 0, export or 'smoke.pkl'
    path = dataset_path('ImageNet', None, path, layout='train/ and val/ folders, one subfolder per class')
    dls = ImageDataLoaders.from_folder(path, valid='val', bs=bs, num_workers=workers, item_tfms=views.item_tfms, batch_tfms=views.batch_tfms)
    model = get_arch(arch)(num_classes=dls.c)
    if reference_stem: model = globals()['reference_stem'](model)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.9, decouple_wd=False), wd=wd, wd_bn_bias=True,
                    metrics=[accuracy, partial(top_k_accuracy, k=5)], cbs=cbs + checkpointing(checkpoint, checkpoint_every, resume))
    speedups(learn, fp16, channels_last, compile)
    start = time.perf_counter()
    with distributed(learn, sync_bn):
        learn.fit(epochs, lr, cbs=ParamScheduler({'lr': step_schedule(lr, (30, 60), 90)}))
        report(learn, dict(dataset='digits (smoke)' if smoke else 'imagenet', arch=arch + (' (reference stem)' if reference_stem else ''),
                           method=method, epochs=epochs), None if smoke else paper_top1('imagenet', arch, method=method), time.perf_counter() - start, top5=True)
    if export: export_and_check(learn, path/export if smoke and export == 'smoke.pkl' else export)
