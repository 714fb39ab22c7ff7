"""Fine-grained classification with contrastive deep supervision, or a baseline: ResNet50 fine-tuned from ImageNet
weights (the paper's Table 6, `--pretrained`, the default) or trained from scratch (Table 5, `--no-pretrained`).

CUB-200-2011, Stanford Cars and Oxford Flowers-102 download through fastai (`URLs.CUB_200_2011`, `URLs.CARS`,
`URLs.FLOWERS`); Stanford Dogs and FGVC Aircraft are not among fastai's datasets: pass `--path` to a local copy.

    python recipes/finegrained.py --dataset cub --method cds                    # paper (Table 6): 82.10 % top-1 (baseline 78.50 %)
    python recipes/finegrained.py --dataset cub --method cds --no-pretrained    # paper (Table 5): 64.65 % (baseline 60.65 %)

A local copy (`--path`) is read in the first of these layouts that fits (`fastai_cds.training.split_table`): an
ImageNet-style folder, CUB-200-2011's own (the official split), Stanford Cars' (cars_annos.mat) or split lists.

The paper gives no fine-grained schedule, and the reference code has no fine-grained script; ours: fine-tuned, fastai's
transfer-learning recipe `fine_tune` (Adam, one epoch with the body frozen, then 30 epochs of one-cycle with
discriminative learning rates, lr 2e-3); from scratch, one-cycle Adam for 150 epochs at lr 8e-3 (no features to start
from: 5x the epochs). Images are presized to 256, then augmented on the batch with fastai's `aug_transforms` (random
resized crop to 224, flip, small rotation/zoom/warp, lighting); CDS's view 2 is cropped from the same presized image,
independently of view 1. The result table prints the paper's number for the dataset, the setting and the method.
"""
import argparse, time, warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from typing import Annotated
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.recipe import *

Switch = Annotated[bool, {'action': argparse.BooleanOptionalAction}]  # --flag / --no-flag
SOURCES = {'cub': ('CUB-200-2011', URLs.CUB_200_2011), 'cars': ('Stanford Cars', URLs.CARS), 'flowers': ('Oxford Flowers-102', URLs.FLOWERS),
           'dogs': ('Stanford Dogs', None), 'aircraft': ('FGVC Aircraft', None)}

@call_parse
def main(
    dataset:str='cub', # cub, cars, flowers (fastai downloads them), dogs, aircraft (pass --path)
    path:str=None, # a local copy instead of fastai's download (see the layouts this recipe reads in its header)
    arch:str='resnet50', # a torchvision architecture: resnet50, resnet18, resnext50_32x4d, ...
    pretrained:Switch=True, # from ImageNet weights with fastai's fine_tune; --no-pretrained: from scratch with fit_one_cycle
    method:str='cds', # base (CE only), dsn, dks, dhm (deep-supervision baselines), cds (SupCon heads, the paper's), cds-simclr
    epochs:int=None, # training epochs (fine_tune: after the frozen ones); default 30 fine-tuned, 150 from scratch
    freeze_epochs:int=1, # fine_tune: epochs training only the new head (and the CDS heads) first
    lr:float=None, # base learning rate; default 2e-3 fine-tuned (fastai's fine_tune default), 8e-3 from scratch (one-cycle peak)
    bs:int=64, # batch size (CDS also runs a second view of each image)
    size:int=224, # training image size (images are presized to 8/7 of it first)
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
    smoke:bool=False, # tiny run on 32x32 digit images written on the spot (1+1 epochs, batch 8, random weights), export included; prints the paper's number
):
    "Fine-tune (or train from scratch) a ResNet on a fine-grained dataset with CDS or a baseline, print the metrics, export the model"
    if dataset not in SOURCES: raise CliError(f"--dataset {dataset}: pick one of {', '.join(SOURCES)}")
    init_distributed()  # launched on N processes (torchrun, accelerate launch): join them, this process's GPU first
    cbs = method_callbacks(method, view2_tfms=simclr_tfms(size=32 if smoke else size), cross_rank=cross_rank)  # view 2 cropped from the presized image
    if seed is not None: set_seed(seed)
    if smoke: path, size, bs, workers, export = smoke_folder(40, 'valid'), 32, 8, 0, export or 'smoke.pkl'
    epochs, lr = epochs or (1 if smoke else 30 if pretrained else 150), lr or (2e-3 if pretrained else 8e-3)
    path = dataset_path(*SOURCES[dataset], path, layout=FOLDER_LAYOUTS)
    dls = ImageDataLoaders.from_df(split_table(path), path, fn_col='file', label_col='label', valid_col='is_valid', bs=bs, num_workers=workers,
                                   item_tfms=PresizeItems(size*8//7, size), batch_tfms=[*setup_aug_tfms([RandomResizedCropBatch(size, 0.35), *aug_transforms()]),
                                   Normalize.from_stats(*imagenet_stats)])  # every random crop per image on the batch: the views stay independent
    learn = arch_learner(arch, dls, cbs + checkpointing(checkpoint, checkpoint_every, resume), pretrained=pretrained and not smoke, scratch_hint='--no-pretrained')  # smoke: no weights offline
    speedups(learn, fp16, channels_last, compile)
    start = time.perf_counter()
    with distributed(learn, sync_bn):
        if pretrained: learn.fine_tune(epochs, lr, freeze_epochs=freeze_epochs)
        else: learn.fit_one_cycle(epochs, lr)
        report(learn, dict(dataset=f'{dataset} (smoke: digits)' if smoke else dataset, arch=arch, weights='ImageNet' if pretrained and not smoke else 'random',
                           method=method, training=f'fine_tune {freeze_epochs}+{epochs}' if pretrained else f'one-cycle {epochs}'),
               paper_top1(dataset, arch, 'pretrained' if pretrained else 'scratch', method=method), time.perf_counter() - start)
    if export: export_and_check(learn, path/export if smoke and export == 'smoke.pkl' else export)
