"""Image-folder datasets for `distill.py` and `semisup.py`: a local folder or a fastai `URLs` name, and one clear line
instead of a traceback when the download fails (an offline machine). Runs before the Learner exists, so nothing of this
module is pickled into an export."""
from pathlib import Path
from fastcore.script import CliError
from fastai.vision.all import *

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
