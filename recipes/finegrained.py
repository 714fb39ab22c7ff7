"""Fine-grained classification with contrastive deep supervision, or a baseline: ResNet50 from ImageNet weights.

CUB-200-2011, Stanford Cars and Oxford Flowers-102 download through fastai (`URLs.CUB_200_2011`, `URLs.CARS`,
`URLs.FLOWERS`); Stanford Dogs and FGVC Aircraft are not among fastai's datasets: pass `--path` to a local copy.

    python recipes/finegrained.py --dataset cub --method cds     # paper: 82.10 % top-1 (baseline 78.50 %)

A local copy (`--path`) is read in the first of these layouts that fits: an ImageNet-style folder (train/ and valid/,
val/ or test/, one subfolder per class), CUB-200-2011's own (images.txt + train_test_split.txt: the official
split), Stanford Cars' (cars_annos.mat with car_ims/), or split lists (train.txt, valid.txt, test.txt of
"file label" lines, as fastai's Oxford Flowers-102: train + valid for training, test for validation).

Deviations from the paper (whose fine-grained training schedule is not restated in our notes): the training is
fastai's transfer-learning recipe, `fine_tune` (Adam, one epoch with the body frozen, then discriminative learning
rates with one-cycle), on images presized to 256 then augmented on the batch with fastai's `aug_transforms`
(random resized crop to 224, flip, small rotation/zoom/warp, lighting). CDS's view 2 is cropped from the same
presized image, independently of view 1. `--fp16` is bfloat16 autocast where the device supports it, else float16.
"""
import argparse, sys, time, warnings
from pathlib import Path
from typing import Annotated
import pandas as pd
import torchvision
from fastcore.basics import str_enum
from fastcore.script import call_parse, CliError
from fastai.vision.all import *
from fastai_cds.callback import CDSCallback, to_mixed_precision
from fastai_cds.views import simclr_tfms
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, report, smoke_folder  # noqa: E402  (run before or after training: not pickled into an export)

Dataset = str_enum('Dataset', 'cub', 'cars', 'flowers', 'dogs', 'aircraft')
Switch = Annotated[bool, {'action': argparse.BooleanOptionalAction}]  # --flag / --no-flag
Method = str_enum('Method', 'base', 'dsn', 'dks', 'dhm', 'cds', 'cds-simclr')
SOURCES = {'cub': ('CUB-200-2011', URLs.CUB_200_2011), 'cars': ('Stanford Cars', URLs.CARS), 'flowers': ('Oxford Flowers-102', URLs.FLOWERS),
           'dogs': ('Stanford Dogs', None), 'aircraft': ('FGVC Aircraft', None)}
PAPER = {('cub', 'resnet50'): dict(base=78.50, dsn=80.14, dks=81.34, dhm=81.27, cds=82.10),  # top-1 %, from ImageNet weights
         ('dogs', 'resnet50'): dict(base=76.47, dsn=77.21, dks=78.32, dhm=78.20, cds=80.99)}
LAYOUTS = ("an ImageNet-style folder (train/ and valid/, val/ or test/, one subfolder per class), CUB-200-2011's "
           "(images.txt, train_test_split.txt), Stanford Cars' (cars_annos.mat, car_ims/) or split lists (train.txt, test.txt)")

def _find(path:Path, name:str)->Path|None:
    "`name` in `path` or up to two folders below"
    return next((f for pat in (name, f'*/{name}', f'*/*/{name}') for f in sorted(path.glob(pat))), None)

def _table(path:Path, files:list, labels:list, valid:list)->pd.DataFrame:
    return pd.DataFrame({'file': [str(Path(f).relative_to(path)) for f in files], 'label': [str(l) for l in labels], 'is_valid': list(valid)})

def imagenet_style(path:Path)->pd.DataFrame|None:
    "train/ and valid/, val/ or test/ folders with a subfolder per class"
    valid = next((d for d in ('valid', 'val', 'test') if (path/d).is_dir()), None)
    if not (path/'train').is_dir() or valid is None: return None
    files = [f for d in ('train', valid) for f in get_image_files(path/d)]
    return _table(path, files, [f.parent.name for f in files], [f.relative_to(path).parts[0] == valid for f in files])

def cub_split(path:Path)->pd.DataFrame|None:
    "CUB-200-2011's official split: images.txt and train_test_split.txt (`id is_training`), images/<class>/<file>"
    f = _find(path, 'train_test_split.txt')
    if f is None or not (f.parent/'images.txt').exists(): return None
    df = pd.read_csv(f.parent/'images.txt', sep=' ', names=['id', 'file']).merge(pd.read_csv(f, sep=' ', names=['id', 'train']), on='id')
    return _table(path, [f.parent/'images'/p for p in df.file], [p.split('/')[0] for p in df.file], df.train == 0)

def cars_annos(path:Path)->pd.DataFrame|None:
    "Stanford Cars' cars_annos.mat: every image's path (car_ims/...), class and test flag"
    f = _find(path, 'cars_annos.mat')
    if f is None: return None
    from scipy.io import loadmat
    mat = loadmat(f, squeeze_me=True)
    a, names = mat['annotations'], mat['class_names']
    files = [f.parent/p for p in a['relative_im_path']]
    if not files[0].exists(): return None
    return _table(path, files, [names[c-1] for c in a['class']], a['test'].astype(bool))

def split_lists(path:Path)->pd.DataFrame|None:
    "Split lists train.txt, valid.txt (both for training) and test.txt (validation) of `file label` lines (fastai's Flowers-102)"
    f = _find(path, 'test.txt')
    if f is None or not (f.parent/'train.txt').exists(): return None
    rows = [(f.parent/fn, lbl, s == 'test') for s in ('train', 'valid', 'test') if (f.parent/f'{s}.txt').exists()
            for fn,lbl in (l.rsplit(maxsplit=1) for l in (f.parent/f'{s}.txt').read_text().splitlines() if l.strip())]
    return _table(path, *zip(*rows))

def split_table(path:Path)->pd.DataFrame:
    "(file relative to `path`, label, is_valid) for every image, from the first layout of `path` that fits"
    for read in (imagenet_style, cub_split, cars_annos, split_lists):
        if (df := read(path)) is not None and len(df) and df.is_valid.any() and not df.is_valid.all(): return df
    raise CliError(f"{path}: not a layout this recipe reads: {LAYOUTS}. Convert it to an ImageNet-style folder and pass that with --path.")

def torch_arch(name:str):
    "The torchvision model constructor called `name`"
    fn = getattr(torchvision.models, name, None)
    if not callable(fn): raise CliError(f"--arch {name}: not a torchvision model (e.g. resnet50, resnet18, resnext50_32x4d)")
    return fn

def method_cbs(method:str, size:int)->list:
    "The callback training with `method`; DSN/DKS/DHM are imported only when asked for"
    if method == 'base': return []
    if method.startswith('cds'): return [CDSCallback(supervised=method == 'cds', view2_tfms=simclr_tfms(size=size))]  # view 2 from the presized image
    try: import fastai_cds.baselines as baselines
    except ImportError: raise CliError(f"--method {method} needs fastai_cds.baselines, which this install of fastai_cds does not have")
    return [getattr(baselines, f'{method.upper()}Callback')()]

def get_path(dataset:str, path:str|None)->Path:
    "`path`, or fastai's download of `dataset`; when that fails, one clear message on how to pass the data with --path"
    if path: return Path(path)
    name, url = SOURCES[dataset]
    if url is None: raise CliError(f"{name} is not among fastai's datasets: download it yourself and pass its folder with --path ({LAYOUTS}).")
    try: return untar_data(url)
    except Exception as e:
        raise CliError(f"Could not download {name} from {url} ({type(e).__name__}: {e}). If this machine is offline, download "
                       f"and extract it elsewhere and pass the folder with --path, e.g. --dataset {dataset} --path ~/data/{dataset}.")

def make_learner(dls:DataLoaders, arch:str, pretrained:bool, **kwargs)->Learner:
    "fastai's `vision_learner`; when the ImageNet weights cannot be downloaded, one clear message"
    try: return vision_learner(dls, torch_arch(arch), pretrained=pretrained, **kwargs)
    except OSError as e:  # urllib's URLError included
        raise CliError(f"Could not download the ImageNet weights of {arch} ({type(e).__name__}: {e}). Put the weights file in "
                       f"{torch.hub.get_dir()}/checkpoints, or pass --no-pretrained to train from scratch.")

@call_parse
def main(
    dataset:Dataset='cub', # cub, cars, flowers (fastai downloads them), dogs, aircraft (pass --path)
    path:str=None, # a local copy instead of fastai's download (see the layouts this recipe reads in its header)
    arch:str='resnet50', # a torchvision architecture in fastai.vision.all: resnet50, resnet18, resnext50_32x4d, ...
    pretrained:Switch=True, # from ImageNet weights with fastai's fine_tune; --no-pretrained: from scratch with fit_one_cycle
    method:Method='cds', # base (CE only), dsn, dks, dhm (deep-supervision baselines), cds (SupCon heads, the paper's), cds-simclr
    epochs:int=30, # training epochs (fine_tune: after the frozen ones)
    freeze_epochs:int=1, # fine_tune: epochs training only the new head (and the CDS heads) first
    lr:float=2e-3, # base learning rate (fastai's fine_tune default; the one-cycle peak from scratch)
    bs:int=64, # batch size (CDS also runs a second view of each image)
    size:int=224, # training image size (images are presized to 8/7 of it first)
    fp16:bool=False, # mixed precision: bfloat16 where the device supports it, else float16 (fastai's to_fp16)
    channels_last:bool=False, # channels-last memory format (fastai's ChannelsLast callback)
    export:str=None, # where to export the trained model: a plain fastai Learner, `load_learner` needs no fastai_cds
    seed:int=None, # seed of Python's, NumPy's and torch's random generators (None: not fixed)
    workers:int=None, # DataLoader worker processes (None: fastai's default)
    smoke:bool=False, # tiny run on 32x32 digit images written on the spot (1+1 epochs, batch 8, random weights), export included
):
    "Fine-tune (or train from scratch) a ResNet on a fine-grained dataset with CDS or a baseline, print the metrics, export the model"
    warnings.filterwarnings('ignore', category=UserWarning)
    if seed is not None: set_seed(seed)
    if smoke: path, size, epochs, bs, workers = smoke_folder(40, 'valid'), 32, 1, 8, 0
    path = get_path(dataset, path)
    # the training: data, learner, fit, export
    dls = ImageDataLoaders.from_df(split_table(path), path, fn_col='file', label_col='label', valid_col='is_valid', bs=bs, num_workers=workers,
                                   item_tfms=Resize(size*8//7), batch_tfms=[*aug_transforms(size=size, min_scale=0.35), Normalize.from_stats(*imagenet_stats)])
    learn = make_learner(dls, arch, pretrained and not smoke, metrics=accuracy, cbs=method_cbs(method, size))  # smoke: no weights offline
    if fp16: to_mixed_precision(learn)
    if channels_last: learn.add_cb(ChannelsLast())
    start = time.perf_counter()
    if pretrained: learn.fine_tune(epochs, lr, freeze_epochs=freeze_epochs)
    else: learn.fit_one_cycle(epochs, lr)
    secs = time.perf_counter() - start
    if smoke and not export: export = path/'smoke.pkl'
    if export: learn.export(Path(export).absolute())
    # the report
    setting = {'dataset': 'digits (smoke)' if smoke else dataset, 'arch': arch, 'weights': 'ImageNet' if pretrained and not smoke else 'random',
               'method': method, 'training': f'fine_tune {freeze_epochs}+{epochs}' if pretrained else f'one-cycle {epochs}'}
    report(learn, setting, None if smoke or not pretrained else PAPER.get((dataset, arch), {}).get(method), secs)
    if export: print(f"exported the trained model to {Path(export).absolute()} (load_learner needs no fastai_cds)")
