"""Fine-grained classification with contrastive deep supervision, or a baseline: ResNet50 fine-tuned from ImageNet
weights (the paper's Table 6: `--pretrained`, on by default here) or trained from scratch (Table 5, `--no-pretrained`).

CUB-200-2011, Stanford Cars and Oxford Flowers-102 download through fastai (`URLs.CUB_200_2011`, `URLs.CARS`,
`URLs.FLOWERS`); Stanford Dogs and FGVC Aircraft are not among fastai's datasets: pass `--path` to a local copy.

    python recipes/finegrained.py --dataset cub --method cds                    # paper (Table 6): 82.10 % top-1 (baseline 78.50 %)
    python recipes/finegrained.py --dataset cub --method cds --no-pretrained    # paper (Table 5): 64.65 % (baseline 60.65 %)

A local copy (`--path`) is read in the first of these layouts that fits (`fastai_cds.recipe.split_table`): an
ImageNet-style folder, CUB-200-2011's own (the official split), Stanford Cars' (cars_annos.mat) or split lists.

The paper gives no fine-grained schedule, and the reference code has no fine-grained script; ours: fine-tuned, fastai's
transfer-learning recipe `fine_tune` (Adam, one epoch with the body frozen, then 30 epochs of one-cycle with
discriminative learning rates, lr 2e-3); from scratch, one-cycle Adam for 150 epochs at lr 8e-3 (no features to start
from: 5x the epochs). Images are presized to 256, then augmented on the batch with fastai's `aug_transforms` (random
resized crop to 224, flip, small rotation/zoom/warp, lighting); CDS's view 2 is cropped from the same presized image,
independently of view 1. The result table prints the paper's number for the dataset, the setting and the method.
"""
import warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from fastai_cds.recipe import *  # before torch: it lets idle CPU threads sleep (OMP_WAIT_POLICY)
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

@call_parse
@recipe_options(pretrained=True)
def main(
    dataset:str='cub', # cub, cars, flowers (fastai downloads them), dogs, aircraft (pass --path)
    arch:str='resnet50', # a torchvision architecture: resnet50, resnet18, resnext50_32x4d, ...
    method:str='cds', # base (CE only), dsn, dks, dhm (deep-supervision baselines), cds (SupCon heads, the paper's), cds-simclr
    epochs:int=None, # training epochs (fine_tune: after the frozen ones); default 30 fine-tuned, 150 from scratch
    freeze_epochs:int=1, # fine_tune: epochs training only the new head (and the CDS heads) first
    lr:float=None, # base learning rate; default 2e-3 fine-tuned (fastai's fine_tune default), 8e-3 from scratch (one-cycle peak)
    bs:int=64, # batch size (CDS also runs a second view of each image)
    size:int=224, # training image size (images are presized to 8/7 of it first)
    **kwargs):
    "Fine-tune (or train from scratch) a ResNet on a fine-grained dataset with CDS or a baseline, print the metrics, export the model"
    run = RecipeRun('finegrained', **kwargs)
    if dataset not in ('cub', 'cars', 'flowers', 'dogs', 'aircraft'):
        raise ValueError(f"--dataset {dataset}: pick cub, cars, flowers, dogs or aircraft")
    if run.smoke: size, bs, epochs = 32, 8, 1
    epochs, lr = epochs or (30 if run.pretrained else 150), lr or (2e-3 if run.pretrained else 8e-3)
    path = run.data_path(dataset)
    crops = setup_aug_tfms([RandomResizedCropBatch(size, 0.35), *aug_transforms()])  # every crop per image, on the batch: independent views
    dls = ImageDataLoaders.from_df(split_table(path), path, fn_col='file', label_col='label', valid_col='is_valid', bs=bs,
                                   num_workers=run.workers, item_tfms=PresizeItems(size*8//7, size),
                                   batch_tfms=[*crops, Normalize.from_stats(*imagenet_stats)])
    cbs = method_callbacks(method, view2_tfms=simclr_tfms(size=size), cross_rank=run.cross_rank)  # view 2 cropped from the presized image
    learn = run.learner(arch_learner(arch, dls, cbs, pretrained=run.pretrained and not run.smoke, wd=run.wd))  # smoke: no weights offline
    with run.training(learn):
        if run.pretrained: learn.fine_tune(epochs, lr, freeze_epochs=freeze_epochs)
        else: learn.fit_one_cycle(epochs, lr)
        run.report(learn, dict(dataset=dataset, arch=arch, weights='ImageNet' if run.pretrained and not run.smoke else 'random',
                               method=method, training=f'fine_tune {freeze_epochs}+{epochs}' if run.pretrained else f'one-cycle {epochs}'),
                   paper_top1(dataset, arch, 'pretrained' if run.pretrained else 'scratch', method=method))
    run.finish(learn)
