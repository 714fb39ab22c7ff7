"""ImageNet with contrastive deep supervision, or a baseline, in the reference code's setting (the paper's Table 3).

The reference setting (ImageNet/Contrastive_Deep_Supervision/main.py) is the default: a torchvision ResNet18 (or 34, 50)
without its max-pool (the reference stem, below), CDS with SupCon heads (weight 0.1, tau 0.07) on the 4 stages, the
reference's two views (`reference_views('imagenet')`: view 1 = RandomResizedCrop(224) + flip, view 2 =
RandomResizedCrop(224, scale 0.2-1) + flip + grouped colour jitter p=0.8 + grayscale 0.2, each an independent crop of
the image, made per image on the device), validation on the centre 224x224 crop of images resized to 256, SGD momentum
0.9, lr 0.1, weight decay 1e-4 on every parameter, batch 256, 90 epochs, lr /10 every 30 epochs; the last and the best
top-1 and top-5 are reported.

    python recipes/imagenet.py --path ~/data/imagenet --arch resnet18       # paper: 72.85 % top-1 (baseline 69.21 %)

The reference stem (`--reference-stem`, the default) leaves out the max-pool as the reference's ImageNet ResNet does (it
defines one but never calls it), so the stages run at twice torchvision's resolution, about 4x the compute: the paper's
numbers come from that network. `--no-reference-stem` keeps torchvision's max-pool (a departure: no paper number).
`--save-model FILE` saves the trained model with its heads: a CDS teacher for `recipes/distill.py --teacher-file FILE`.
`--bs` is the batch of each process: on N GPUs (`accelerate launch` / `torchrun`, see the README) pass --bs 256/N.
ImageNet cannot be downloaded by fastai: pass a local copy with train/ and val/, one subfolder per class.
What still differs from the reference: recipes/README.md.
"""
import warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
from fastai_cds.recipe import *  # before torch: it lets idle CPU threads sleep (OMP_WAIT_POLICY)
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

@call_parse
@recipe_options(but='pretrained', wd=1e-4)
def main(
    arch:str='resnet18', # a torchvision architecture: resnet18, resnet50, ...
    reference_stem:Switch=True, # no max-pool, as the reference's ResNet (--no-reference-stem: torchvision's max-pool, ~4x less compute)
    method:str='cds', # base (CE only), dsn, dks, dhm (deep-supervision baselines), cds (SupCon heads, the paper's), cds-simclr
    epochs:int=90, # training epochs; lr /10 after 1/3 and 2/3 of them (30 and 60 of 90)
    bs:int=256, # batch size of each process (CDS also runs a second view of each image)
    lr:float=0.1, # learning rate
    size:int=224, # training and validation image size (items are presized to 8/7 of it)
    save_model:str='', # save the trained model with its heads (`learn.save`) to this .pth file: a teacher for distill.py --teacher-file
    **kwargs):
    "Train a ResNet on ImageNet with CDS or a baseline, print the last and best top-1/top-5 as a table, export the model"
    run = RecipeRun('imagenet', **kwargs)
    if run.smoke: size, epochs, bs = 32, 1, 8
    make_dls, v2, model, check, fit = reference_setting('imagenet', 'imagenet', run, size, bs, stem=reference_stem)
    check(arch)  # an unknown --arch: the choices, before any data
    dls, cbs = make_dls(), method_callbacks(method, view2_tfms=v2, cross_rank=run.cross_rank) + [BestMetrics()]
    learn = run.learner(reference_learner(dls, model(arch, dls.c), run.wd, [accuracy, partial(top_k_accuracy, k=5)], cbs))
    with run.training(learn):
        fit(learn, epochs, lr)
        run.report(learn, dict(dataset='imagenet', arch=arch + (' (reference stem)' if reference_stem else ''), method=method,
                               epochs=epochs), paper_top1('imagenet', arch, method=method) if reference_stem else None, top5=True)
    if save_model:  # the model with its heads (CDS), in the file's own folder
        learn.model_dir = Path(save_model).absolute().parent
        learn.save(Path(save_model).name.removesuffix('.pth'), with_opt=False)
    run.finish(learn)
