"""CIFAR-10 / CIFAR-100 with contrastive deep supervision, or a baseline, in the paper's ResNet setting.

The paper's setting is the default: ResNet18 with a CIFAR stem, CDS with SupCon heads (weight 0.1, tau 0.07),
SGD momentum 0.9, weight decay 5e-4, lr 0.1, batch 128, 300 epochs, lr /10 at epochs 90, 180 and 280:

    python recipes/cifar.py --dataset cifar100 --method cds      # paper: 80.84 % top-1 (baseline 77.45 %)

Deviations from the reference code:
- The model is torchvision's ResNet with its stem swapped for a CIFAR one (3x3 stride-1 conv, no max-pool), built
  by fastai's `vision_learner` with a plain head (global average pooling, one linear layer); the reference code
  has its own ResNet class, which differs in small details (e.g. its shortcut convolutions).
- View 1 is the reference augmentation: pad 4 + random 32x32 crop (fastai's `CropPad` + `RandomCrop`), a random
  flip, and Cutout 16x16 written below as a fastai batch transform; fastai's `RandomErasing` was not used because
  it erases one rectangle at the same place in every image of a batch (and fills it with noise), where Cutout
  places a zero square independently in each image. The crop is an item transform, so both views share it;
  view 2 adds its own random resized crop (scale 0.2-1), flip, colour jitter and grayscale on top.
- Weight decay is applied to every parameter, BN and biases included (torch SGD's `weight_decay`, as the reference);
  fastai's default would skip them.
- The step schedule is given as fractions of training (30 %, 60 %, 93.3 %), so shorter runs keep its shape.
- `--fp16` is bfloat16 autocast where the device supports it (CPU, Ampere and later GPUs), float16 with loss
  scaling on older GPUs; the reference code trains in fp32.
"""
import argparse, sys, time, warnings
from functools import partial
from pathlib import Path
from typing import Annotated
import torchvision
from fastcore.basics import str_enum
from fastcore.script import call_parse, CliError
from fastai.vision.all import *
from fastai_cds.callback import CDSCallback, to_mixed_precision
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, report, smoke_folder  # noqa: E402  (run before or after training: not pickled into an export)

Dataset = str_enum('Dataset', 'cifar10', 'cifar100')
Switch = Annotated[bool, {'action': argparse.BooleanOptionalAction}]  # --flag / --no-flag
Method = str_enum('Method', 'base', 'dsn', 'dks', 'dhm', 'cds', 'cds-simclr')
Schedule = str_enum('Schedule', 'reference', 'one-cycle')
SOURCES = {'cifar10': ('CIFAR-10', URLs.CIFAR), 'cifar100': ('CIFAR-100', URLs.CIFAR_100)}
PAPER = {('cifar100', 'resnet18'): dict(base=77.45, dsn=78.30, dks=78.96, dhm=78.82, cds=80.84),  # top-1 %, 300 epochs
         ('cifar100', 'resnet50'): dict(base=77.81, dsn=78.96, dks=80.95, dhm=81.12, cds=81.31),
         ('cifar10', 'resnet18'): dict(base=94.96, dsn=95.31, dks=95.72, dhm=95.61, cds=96.49)}

def with_cifar_stem(arch):
    "`arch` (a torchvision ResNet-family constructor) with a CIFAR stem: 3x3 stride-1 first conv, no max-pool"
    def cifar_arch(*args, **kwargs):
        m = arch(*args, **kwargs)
        if not isinstance(getattr(m, 'conv1', None), nn.Conv2d) or not hasattr(m, 'maxpool'):
            raise CliError(f"--cifar-stem needs a torchvision ResNet-family arch (with `conv1` and `maxpool`), not {arch.__name__}: pass --no-cifar-stem")
        m.conv1, m.maxpool = nn.Conv2d(m.conv1.in_channels, m.conv1.out_channels, 3, 1, 1, bias=False), nn.Identity()
        return m
    cifar_arch.__name__ = cifar_arch.__qualname__ = f'{arch.__name__}_cifar'
    model_meta[cifar_arch] = model_meta.get(arch, {'cut': None, 'split': default_split})  # fastai's cut and splitter
    return cifar_arch

class Cutout(RandTransform):
    "Cutout (DeVries & Taylor 2017): zero a `size`x`size` square centred on a random pixel of each image (after `Normalize`)"
    order = 100
    def __init__(self, size:int=16): super().__init__(p=1.); self.size = size
    def encodes(self, x:TensorImage):
        n, _, h, w = x.shape
        cy, cx = (torch.randint(0, k, (n, 1, 1), device=x.device) for k in (h, w))
        ys, xs, r = torch.arange(h, device=x.device)[:, None], torch.arange(w, device=x.device), self.size//2
        hole = (ys >= cy-r) & (ys < cy+r) & (xs >= cx-r) & (xs < cx+r)
        return x * ~hole[:, None]

def step_schedule(lr:float, milestones:tuple=(90, 180, 280), total:int=300, gamma:float=0.1):
    "The reference step schedule as a fastai schedule: `lr`, times `gamma` at each milestone (fractions of `total`)"
    bounds = [0, *[m/total for m in milestones], 1]
    pcts = [b-a for a,b in zip(bounds, bounds[1:])]
    pcts[-1] = 1 - sum(pcts[:-1])  # `combine_scheds` wants them to sum to exactly 1
    return combine_scheds(pcts, [SchedNo(lr*gamma**i, lr*gamma**i) for i in range(len(pcts))])

def method_cbs(method:str)->list:
    "The callback training with `method`; DSN/DKS/DHM are imported only when asked for"
    if method == 'base': return []
    if method.startswith('cds'): return [CDSCallback(supervised=method == 'cds')]  # cds-simclr: SimCLR's NT-Xent
    try: import fastai_cds.baselines as baselines
    except ImportError: raise CliError(f"--method {method} needs fastai_cds.baselines, which this install of fastai_cds does not have")
    return [getattr(baselines, f'{method.upper()}Callback')()]

def torch_arch(name:str):
    "The torchvision model constructor called `name`"
    fn = getattr(torchvision.models, name, None)
    if not callable(fn): raise CliError(f"--arch {name}: not a torchvision model (e.g. resnet18, resnet50, wide_resnet50_2)")
    return fn

def download(name:str, url:str)->Path:
    "fastai's `untar_data(url)`; when it fails, one clear message on how to pass the data with --path"
    try: return untar_data(url)
    except Exception as e:
        raise CliError(f"Could not download {name} from {url} ({type(e).__name__}: {e}). If this machine is offline, "
                       f"download and extract it elsewhere and pass the folder with --path (train/ and test/ class subfolders).")

def check_folder(path:Path, valid:str)->Path:
    "`path`, if it has train/ and `valid`/ folders of class subfolders"
    if not all((path/d).is_dir() and any(p.is_dir() for p in (path/d).iterdir()) for d in ('train', valid)):
        raise CliError(f"--path {path}: expected an ImageNet-style folder with train/ and {valid}/, each with one subfolder per class")
    return path

@call_parse
def main(
    dataset:Dataset='cifar100', # which CIFAR
    path:str=None, # a local copy instead of fastai's download: a folder with train/ and test/, one subfolder per class
    arch:str='resnet18', # a torchvision architecture in fastai.vision.all: resnet18, resnet50, wide_resnet50_2, resnext50_32x4d, ...
    cifar_stem:Switch=True, # 3x3 stride-1 first conv and no max-pool, as CIFAR ResNets (torchvision ResNet family only)
    method:Method='cds', # base (CE only), dsn, dks, dhm (deep-supervision baselines), cds (SupCon heads, the paper's), cds-simclr
    schedule:Schedule='reference', # reference: SGD, lr /10 at epochs 90, 180, 280 of 300 (scaled to --epochs); one-cycle: fastai's fit_one_cycle
    epochs:int=300, # training epochs
    bs:int=128, # batch size (CDS also runs a second view of each image)
    lr:float=0.1, # learning rate (one-cycle: the peak)
    wd:float=5e-4, # weight decay (L2, on every parameter, as torch SGD)
    cutout:int=16, # side of the Cutout square in pixels (0: no Cutout)
    fp16:bool=False, # mixed precision: bfloat16 where the device supports it, else float16 (fastai's to_fp16)
    channels_last:bool=False, # channels-last memory format (fastai's ChannelsLast callback)
    export:str=None, # where to export the trained model: a plain fastai Learner, `load_learner` needs no fastai_cds
    seed:int=None, # seed of Python's, NumPy's and torch's random generators (None: not fixed)
    workers:int=None, # DataLoader worker processes (None: fastai's default)
    smoke:bool=False, # tiny run on 16x16 digit images written on the spot (1 epoch, batch 8), export included: checks the whole path
):
    "Train a ResNet on CIFAR-10/100 with CDS or a baseline, print the validation metrics as a table, export the model"
    warnings.filterwarnings('ignore', category=UserWarning)
    if seed is not None: set_seed(seed)
    size = 16 if smoke else 32  # CIFAR images are 32x32
    if smoke: path, epochs, bs, workers = smoke_folder(size, 'test'), 1, 8, 0
    path = check_folder(Path(path), 'test') if path else download(*SOURCES[dataset])
    # the training: data, learner, fit, export
    dls = ImageDataLoaders.from_folder(path, valid='test', bs=bs, num_workers=workers, item_tfms=[CropPad(size+8), RandomCrop(size)],  # pad 4, crop
                                       batch_tfms=[Flip(), Normalize.from_stats(*cifar_stats)] + ([Cutout(cutout)] if cutout else []))
    model_fn = torch_arch(arch)
    learn = vision_learner(dls, with_cifar_stem(model_fn) if cifar_stem else model_fn, pretrained=False, normalize=False,
                           concat_pool=False, lin_ftrs=[], ps=0., first_bn=False,  # the plain head: pooling, one linear layer
                           opt_func=partial(SGD, mom=0.9, decouple_wd=False), wd=wd, wd_bn_bias=True, metrics=accuracy, cbs=method_cbs(method))
    if fp16: to_mixed_precision(learn)
    if channels_last: learn.add_cb(ChannelsLast())
    start = time.perf_counter()
    if schedule == 'reference': learn.fit(epochs, lr, cbs=ParamScheduler({'lr': step_schedule(lr)}))
    else: learn.fit_one_cycle(epochs, lr)
    secs = time.perf_counter() - start
    if smoke and not export: export = path/'smoke.pkl'
    if export: learn.export(Path(export).absolute())
    # the report
    setting = {'dataset': 'digits (smoke)' if smoke else dataset, 'arch': arch + (' (CIFAR stem)' if cifar_stem else ''),
               'method': method, 'schedule': schedule, 'epochs': epochs}
    report(learn, setting, None if smoke else PAPER.get((dataset, arch), {}).get(method), secs)
    if export: print(f"exported the trained model to {Path(export).absolute()} (load_learner needs no fastai_cds)")
