"""One command for a CUDA machine: what CDS costs and that it trains, in one table, in a few minutes.

    python bench/gpu.py                      # on a CUDA machine
    python bench/gpu.py --device cpu --tiny  # the same path on a CPU with tiny models, in seconds (the test suite runs it)

(1) One training step (`Learner.one_batch`) of CDS on N images (two views: 2N through the network) against the plain
    model on the same 2N images, interleaved, median of `--reps` steps after a warm-up, and the peak memory of a step
    (`torch.cuda.max_memory_allocated`), for a CIFAR ResNet18 (32x32, N=128) and a ResNet50 (224x224, N=64), in fp32,
    bf16 (`to_mixed_precision`), bf16 + channels-last (fastai's `ChannelsLast`) and bf16 + `CompileCallback()`.
(2) The two-view CIFAR loader: images in memory, both reference views made on the device (`tensor_dls`, `two_view_dl`),
    against the reference's per-item PIL `TwoCropTransform` in a torch DataLoader with the same worker processes.
(3) `--train-steps` real CDS training steps (bf16) of the CIFAR ResNet18 on synthetic CIFAR-shaped data (a class-wise
    pattern plus noise): the mean training loss of the first and last 20 steps.
"""
import os, sys, time, warnings
import numpy as np
import torch, torchvision
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.recipe import speedups
from fastai_cds.benchmark import start_training, interleaved_times, bench_loaders

def models(tiny:bool)->list:
    "(name, model maker, image size, N)"
    if tiny: return [('small CNN 16x16', lambda: small_cnn(n_in=3, width=4), 16, 4)]
    return [('CIFAR ResNet18 32x32', lambda: cifar_resnet('resnet18', 100), 32, 128),
            ('ResNet50 224x224', lambda: torchvision.models.resnet50(num_classes=1000), 224, 64)]

SETTINGS = {'fp32': {}, 'bf16': dict(bf16=True), 'bf16 + channels-last': dict(bf16=True, cl=True), 'bf16 + compile': dict(bf16=True, compile=True)}

def synthetic_dls(n:int, size:int, bs:int, device, n_classes:int=10, seed:int=0)->DataLoaders:
    "In-memory uint8 images: a fixed random pattern per class plus noise (learnable), Normalize; `bs` images per batch"
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(n_classes, (n,), generator=g)
    pats = torch.randint(0, 256, (n_classes, 3, size, size), generator=g).float()
    ims = (0.6*pats[ys] + 0.4*torch.randint(0, 256, (n, 3, size, size), generator=g).float()).to(torch.uint8)
    return tensor_dls((ims, ys), (ims[:bs], ys[:bs]), [str(i) for i in range(n_classes)], bs=bs, device=device,
                      batch_tfms=[Flip(), Normalize.from_stats(*imagenet_stats)])

def learner(make, dls, cds:bool, bf16:bool=False, cl:bool=False, compile:bool=False, backend:str='inductor')->Learner:
    "A Learner of `make()` on `dls`, with CDS if `cds`, and the recipes' speed-ups (`speedups`); compiled with `backend`"
    learn = speedups(Learner(dls, make(), loss_func=CrossEntropyLossFlat(), cbs=[CDSCallback(verbose=False)] if cds else []), bf16, cl)
    if compile: learn.add_cb(CompileCallback(backend=backend))
    return learn

def step_table(name, make, size, n, device, reps, warmup, backend)->list:
    "Rows: setting, CDS ms, plain 2N ms, ratio, peak memory CDS / plain 2N"
    dev = torch.device(device)
    dls = synthetic_dls(4*n, size, n, device)
    x, y = next(iter(two_view_dl(dls.train, simclr_tfms(size))))
    rows = []
    for setting, kw in SETTINGS.items():
        ls = {'CDS': learner(make, dls, True, backend=backend, **kw), 'plain 2N': learner(make, dls, False, backend=backend, **kw)}
        bs = {'CDS': (x, y), 'plain 2N': (x, torch.cat([y, y]))}
        for l in ls.values(): start_training(l)
        t = interleaved_times({k: (lambda k=k: ls[k].one_batch(0, bs[k])) for k in ls}, reps, warmup,
                              sync=torch.cuda.synchronize if dev.type == 'cuda' else None)
        mem = {}
        if dev.type == 'cuda':  # peak of a step of each, measured alone
            for k in ls:
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); ls[k].one_batch(0, bs[k]); torch.cuda.synchronize()
                mem[k] = torch.cuda.max_memory_allocated()
        rows.append((name, n, setting, t.median['CDS'], t.median['plain 2N'], t.ratio('CDS', 'plain 2N'),
                     mem['CDS']/mem['plain 2N'] if mem else None))
        for l in ls.values(): l.model._compiled_call_impl = None
    return rows

def train_curve(make, size, n, device, steps)->tuple[float, float]:
    "Mean CDS training loss (bf16) of the first and the last 20 of `steps` steps"
    dls = synthetic_dls(max(steps, 40)*n//4, size, n, device)
    learn = learner(make, dls, True, bf16=True)
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
    learn.logger = noop
    losses = []
    class Grab(Callback):
        def after_batch(self):
            if self.training: losses.append(self.learn.loss.item())
            if len(losses) >= steps: raise CancelFitException
    learn.fit(10**6, 1e-3, cbs=Grab())
    k = min(20, len(losses)//2)
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))

@call_parse
def main(
    device:str='cuda', # cuda or cpu
    tiny:bool=False, # tiny models, sizes and step counts (seconds, on a CPU)
    reps:int=20, # measured steps per learner and setting
    warmup:int=5, # unmeasured steps first (compilation happens there)
    train_steps:int=300, # real training steps of (3)
    backend:str=None, # torch.compile backend (default: inductor; --tiny: aot_eager, which generates no code)
    threads:int=1, # torch threads on a CPU
):
    "Print the table of CDS's cost per setting, the loader throughput and a short real training"
    warnings.filterwarnings('ignore')
    if device.startswith('cuda') and not torch.cuda.is_available():
        print("bench/gpu.py: CUDA is not available on this machine; run it on a CUDA machine, or try --device cpu --tiny"); sys.exit(1)
    if tiny: reps, warmup, train_steps = min(reps, 3), min(warmup, 2), min(train_steps, 40)
    backend = backend or ('aot_eager' if tiny else 'inductor')
    if device == 'cpu': torch.set_num_threads(threads)
    start = time.perf_counter()
    what = torch.cuda.get_device_name(device) if device.startswith('cuda') else f'CPU, {os.cpu_count()} cores'
    print(f"device: {what}; torch {torch.__version__}; medians of {reps} interleaved steps after {warmup} warm-up steps; compile backend {backend}\n")
    print("| model | N | setting | CDS step ms | plain 2N step ms | CDS / plain 2N | peak memory CDS / plain 2N |\n|---|---|---|---|---|---|---|")
    for name, make, size, n in models(tiny):
        for r in step_table(name, make, size, n, device, reps, warmup, backend):
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.3f} | {'-' if r[6] is None else f'{r[6]:.3f}'} |", flush=True)
    nw = 0 if tiny else min(8, os.cpu_count())  # the reference's workers; ours needs none
    lo = bench_loaders(16 if tiny else 256, 2 if tiny else 20, 1 if tiny else 3, workers=(nw,), device=device)[nw]
    print(f"\ntwo-view CIFAR loader: ours (in memory, views on {device}, no workers) {lo['ours']:,.0f} images/s, reference per-item PIL with {nw} workers "
          f"{lo['reference']:,.0f} images/s: {lo['ours']/lo['reference']:.1f}x")
    name, make, size, n = models(tiny)[0]
    first, last = train_curve(make, size, n, device, train_steps)
    print(f"{train_steps} CDS training steps (bf16) of the {name} on synthetic data: loss {first:.3f} (first steps) -> {last:.3f} (last steps): "
          f"{'goes down' if last < first else 'DOES NOT GO DOWN'}")
    print(f"total {time.perf_counter() - start:.0f} s")
