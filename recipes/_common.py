"""What the recipes share, all of it run before or after training (nothing of this module is pickled into an export):
image-folder datasets for `distill.py` and `semisup.py` (a local folder or a fastai `URLs` name, one clear line instead
of a traceback when the download fails), the `--smoke` folder and the result table of `cifar.py` and `finegrained.py`."""
import atexit, shutil, tempfile
from pathlib import Path
from fastcore.script import CliError
from fastai.vision.all import *
from fastai_cds.data import digits_items
from fastai_cds.metrics import ece

def get_path(dataset:str)->Path:
    "`dataset` if it is a folder, else fastai's download of `URLs.<dataset>`; when that fails, one clear message on how to pass a folder"
    if Path(dataset).exists(): return Path(dataset)
    url = getattr(URLs, dataset, None)
    if not isinstance(url, str): raise CliError(f"--dataset {dataset}: not digits, a folder or a fastai URLs name (CIFAR, IMAGENETTE_160, ...)")
    try: return untar_data(url)
    except Exception as e:
        raise CliError(f"Could not download {dataset} from {url} ({type(e).__name__}: {e}). If this machine is offline, download and "
                       f"extract it elsewhere and pass the folder as --dataset (train/ and valid/, val/ or test/, a subfolder per class).")

def folder_dls(dataset:str, size:int, bs:int, seed:int)->DataLoaders:
    "DataLoaders of `dataset` (see `get_path`) with train/ and valid/ (or val/, test/): resized, fastai's default augmentation"
    path = get_path(dataset)
    valid = next((v for v in ('valid', 'val', 'test') if (path/v).exists()), None)
    if valid is None: raise CliError(f"{path} has no valid/, val/ or test/ folder")
    return ImageDataLoaders.from_folder(path, train='train', valid=valid, item_tfms=Resize(size), bs=bs, seed=seed,
                                        batch_tfms=[*aug_transforms(), Normalize.from_stats(*imagenet_stats)])

def smoke_folder(size:int, valid:str, n_train:int=3, n_valid:int=2)->Path:
    "An ImageNet-style folder of scikit-learn's digits (train/ and `valid`/, a subfolder per class) in a temporary directory"
    root = Path(tempfile.mkdtemp(prefix='cds_smoke_'))
    atexit.register(shutil.rmtree, root, True)
    seen = {}
    for im, y in digits_items(n_channels=3)[0]:
        k = seen[y] = seen.get(y, -1) + 1
        if k >= n_train + n_valid: continue
        (d := root/('train' if k < n_train else valid)/str(y)).mkdir(parents=True, exist_ok=True)
        PILImage.create(im).resize((size, size)).save(d/f'{k}.png')
    return root

def print_table(row:dict):
    "One result row as a markdown table"
    cols = {k: str(v) for k,v in row.items()}
    w = [max(len(k), len(v)) for k,v in cols.items()]
    for line in (cols.keys(), ['-'*n for n in w], cols.values()): print('| ' + ' | '.join(s.ljust(n) for s,n in zip(line, w)) + ' |')

def report(learn:Learner, setting:dict, paper:float|None, secs:float):
    "Validation top-1, calibration error and loss of `learn`, printed as a table with the paper's number"
    with learn.no_bar(): probs, targs, losses = learn.get_preds(with_loss=True)
    print_table({**setting, 'top-1 (%)': f'{accuracy(probs, targs).item()*100:.2f}', 'ECE (%)': f'{ece(probs, targs)*100:.2f}',
                 'valid loss': f'{losses.mean().item():.4f}', 'paper top-1 (%)': paper or '-', 'train time': f'{secs:.1f} s' if secs < 120 else f'{secs/60:.1f} min'})

def print_export(fname:str, what:str='model'):
    "Load the exported learner `fname` back and say what it holds"
    loaded = load_learner(Path(fname).absolute())
    print(f"exported the {what} to {Path(fname).absolute()}: a plain {type(loaded.model).__name__}, "
          f"{sum(p.numel() for p in loaded.model.parameters())} parameters")
