"""What CDS costs, measured side by side: training step time and memory, two-view augmentation throughput, export.

(a) One fastai training step (`Learner.one_batch`: callbacks, forward, loss, backward, optimizer step) of five learners
    on the same images, interleaved step by step (order rotated every round), median over `--reps` steps each:
    CDS on N images (two views: 2N through the network), the plain model on the same 2N images (the floor: CDS cannot
    cost less than a forward/backward of 2N images), the plain model on N images, and CDS with head='mlp' and with head=partial(SepConvHead, checkpoint=True). Peak memory is
    measured with torch.profiler (`profile_memory=True`: the allocations and frees of every op, summed in time order)
    plus the tensors that live across steps (parameters, gradients, optimizer state, the batch).
    Each head and the contrastive losses are also timed alone in the same rounds, to say where the time of CDS beyond
    the floor goes.
(b) Two-view augmentation throughput, images per second (each image gives both views, normalised): our views made on
    the batch (`two_view_dl`, `simclr_tfms`), as the batch transform alone and through the whole fastai DataLoader,
    against a per-item PIL pipeline of torchvision transforms with the reference recipe (view 1: RandomCrop 32 pad 4 +
    flip; view 2: RandomResizedCrop scale 0.2-1, flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale 0.2)
    run through a torch DataLoader with 0 and 2 workers.
(c) The exported CDS learner against the exported plain learner: parameters, file size, inference latency (with an A/A
    control, the plain file loaded twice, which shows the noise of the latency measurement on this machine).

Models: a CIFAR-style ResNet18 at 32x32 (3x3 stride-1 stem, no max-pool) and torchvision's ResNet18 at 64x64, N=32.
On a CPU every op runs synchronously, so wall time around a step is its time. Not run by CI.
"""
import itertools, os, tempfile, warnings
from pathlib import Path
import PIL.Image
import torch, torch.nn as nn, torchvision
from torch.profiler import profile, ProfilerActivity
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.benchmark import CIFAR_STATS, synthetic_items, image_dls, start_training, interleaved_times, images_per_s, bench_loaders

MODELS = {'CIFAR ResNet18 32x32': (lambda: cifar_resnet('resnet18', 10), 32), 'ResNet18 64x64': (lambda: torchvision.models.resnet18(num_classes=10), 64)}

# ---------------------------------------------------------------- (a) training steps
def state_bytes(learn:Learner, batch:tuple)->int:
    "Bytes of the tensors that live across steps: parameters, gradients, optimizer state, the batch"
    ps = list(learn.model.parameters())
    n = sum(p.numel()*p.element_size() for p in ps) + sum(p.grad.numel()*p.grad.element_size() for p in ps if p.grad is not None)
    for p in ps:
        for v in learn.opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor): n += v.numel()*v.element_size()
    return n + sum(t.numel()*t.element_size() for t in batch)

def step_peak_bytes(learn:Learner, batch:tuple)->int:
    "Peak of the memory allocated during one training step above its start (torch.profiler, per-op allocations)"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: learn.one_batch(0, batch)
    evs = sorted(prof.events(), key=lambda e: e.time_range.start)
    return max(itertools.accumulate(e.self_cpu_memory_usage for e in evs), default=0)

def component_fns(learn:Learner, x:Tensor, y:Tensor)->dict:
    "The parts of a CDS step beyond the plain one, as functions to time alone: every head, the contrastive losses"
    ds, cds = learn.model, learn.cds
    with torch.no_grad():
        ds.arm(); ds(x)
        outs = [o.detach().requires_grad_() for o in ds.read().stages]
    ids = y.long()
    def head(h, o): return lambda: h(o).float().pow(2).sum().backward()  # forward + backward, gradient to the stage too
    zs = [h(o).detach().requires_grad_() for h,o in zip(ds.heads, outs)]
    def supcon(): torch.stack([cds.contrastive(z, ids) for z in zs]).sum().backward()
    fns = {f'head on {s} {tuple(o.shape[1:])}': head(h, o) for s,h,o in zip(ds.stages, ds.heads, outs)}
    return {**fns, 'contrastive losses': supcon}

STEPS = ['CDS (N, two views)', 'plain 2N', 'plain N', "CDS, head='mlp'", 'CDS, heads NCHW, nothing recomputed (the previous default)',
         'CDS, every head block recomputed']
OPTIONS = STEPS[3:]  # other settings of CDSCallback
COMPILED = ['CDS compiled', 'plain 2N compiled']  # CompileCallback() (inductor) on CDS and on the plain model

def bench_steps(name:str, make, size:int, n:int, reps:int, warmup:int, profile_top:int, compiled:bool=False)->dict:
    "Step time and memory of CDS on N vs plain on 2N and N, and the parts of CDS alone, all interleaved"
    items = synthetic_items(4*n, size)
    dls = image_dls(items, n)
    set_seed(0)
    learners = {'CDS (N, two views)': Learner(dls, make(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)),
                'plain 2N': Learner(dls, make(), loss_func=CrossEntropyLossFlat()),
                'plain N': Learner(dls, make(), loss_func=CrossEntropyLossFlat()),
                "CDS, head='mlp'": Learner(dls, make(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(head='mlp', verbose=False)),
                'CDS, heads NCHW, nothing recomputed (the previous default)': Learner(dls, make(), loss_func=CrossEntropyLossFlat(),
                    cbs=CDSCallback(head=partial(SepConvHead, checkpoint=0, channels_last=False), verbose=False)),
                'CDS, every head block recomputed': Learner(dls, make(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(head=partial(SepConvHead, checkpoint=True), verbose=False))}
    if compiled:  # the same pair compiled (inductor), in the same interleaved rounds
        learners['CDS compiled'] = Learner(dls, make(), loss_func=CrossEntropyLossFlat(), cbs=[CDSCallback(verbose=False), CompileCallback()])
        learners['plain 2N compiled'] = Learner(dls, make(), loss_func=CrossEntropyLossFlat(), cbs=CompileCallback())
    for l in learners.values(): start_training(l)
    cds = learners['CDS (N, two views)']
    x, y = next(iter(cds.dl))  # two views of N images: (2N, 3, h, w), (N,)
    x, y = x.as_subclass(Tensor), y.as_subclass(Tensor)
    batches = {'CDS (N, two views)': (x, y), 'plain 2N': (x, torch.cat([y, y])), 'plain N': (x[:n], y), **{k: (x, y) for k in OPTIONS}}
    steps = STEPS + (COMPILED if compiled else [])
    if compiled:
        batches.update({'CDS compiled': (x, y), 'plain 2N compiled': (x, torch.cat([y, y]))})
        for k in COMPILED:
            for _ in range(3): learners[k].one_batch(0, batches[k])  # compiles: minutes on a CPU, outside the measured rounds
    fns = {k: (lambda k=k: learners[k].one_batch(0, batches[k])) for k in steps}
    parts = component_fns(cds, x, y)
    fns.update(parts)
    t = interleaved_times(fns, reps, warmup)
    mem = {k: state_bytes(learners[k], batches[k]) + step_peak_bytes(learners[k], batches[k]) for k in STEPS}
    for k in COMPILED if compiled else []: learners[k].model._compiled_call_impl = None  # nothing compiled left behind for the export
    prof_rows = []
    if profile_top:
        for k in STEPS[:2]:
            with profile(activities=[ProfilerActivity.CPU]) as prof: fns[k]()
            prof_rows.append((k, prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=profile_top)))
    return dict(name=name, n=n, med=t.median, best=t.best, mem=mem, parts=list(parts), prof=prof_rows, cds=cds, compiled=compiled,
                plain=learners['plain N'], x=x)

# ---------------------------------------------------------------- (b) two views
class PILTwoViews(torch.utils.data.Dataset):
    "Per-item PIL pipeline with the reference recipe: (view 1, view 2, label)"
    def __init__(self, items:list, size:int):
        import torchvision.transforms as T
        self.ims, self.ys = [PIL.Image.fromarray(im) for im,_ in items], [y for _,y in items]
        norm = [T.ToTensor(), T.Normalize(*CIFAR_STATS)]
        self.v1 = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), *norm])
        self.v2 = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.)), T.RandomHorizontalFlip(),
                             T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2), *norm])
    def __len__(self): return len(self.ims)
    def __getitem__(self, i): return self.v1(self.ims[i]), self.v2(self.ims[i]), self.ys[i]

def bench_views(size:int, bs:int, n_batches:int, rounds:int)->dict:
    "Two-view throughput of our batch views and of the per-item PIL pipeline"
    items = synthetic_items(bs*n_batches, size, seed=1)
    dls = image_dls(items + items[:1], bs)  # item 0 is the validation set
    tdl = dls.train.new(shuffle=False, drop_last=True)
    vdl = two_view_dl(tdl, simclr_tfms())
    raw = [b for b in tdl.new(after_batch=Pipeline([]))]  # collated uint8 batches, before any batch transform
    tw = vdl.after_batch
    res = {'ours: batch transform only (on the collated batch)': images_per_s(lambda: (tw(b) for b in raw), len(raw)*bs, rounds),
           'ours: fastai DataLoader, 0 workers': images_per_s(lambda: iter(vdl), len(vdl)*bs, rounds)}
    ds = PILTwoViews(items, size)
    for nw in (0, 2):
        dl = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=nw, drop_last=True, persistent_workers=nw > 0)
        res[f'PIL per item, torch DataLoader, {nw} workers'] = images_per_s(lambda: iter(dl), len(dl)*bs, rounds)
    b = tuple(raw[0])
    per_tfm = []
    for view, pipe in (('view 1', tw.fs[0].view1), ('view 2', tw.fs[0].view2)):
        cur = b
        for f in pipe.fs:
            fs = {type(f).__name__: f}
            if isinstance(f, ColorJitterBatch):  # the hue's share: the same jitter without it, timed in the same rounds
                fs['ColorJitterBatch without the hue shift (hue=0)'] = ColorJitterBatch(f.brightness, f.contrast, f.saturation, 0., f.p_img)
            t = interleaved_times({k: (lambda g=g: g(cur, split_idx=0)) for k,g in fs.items()}, rounds).median
            per_tfm += [(view, k, t[k]) for k in fs]
            cur = f(cur, split_idx=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof: tw(raw[0])
    return res, per_tfm, prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=10)

# ---------------------------------------------------------------- (c) export
def bench_export(r:dict, reps:int)->dict:
    "Exported CDS learner vs exported plain learner: parameters, file size, latency of a forward on N images"
    d = Path(tempfile.mkdtemp())
    r['cds'].export(d/'cds.pkl'); r['plain'].export(d/'plain.pkl')
    ms = {k: load_learner(d/f'{f}.pkl').model.eval() for k,f in (('cds', 'cds'), ('plain', 'plain'), ('plain again', 'plain'))}
    x = r['x'][:r['n']]
    with torch.no_grad(): t = interleaved_times({k: (lambda m=m: m(x)) for k,m in ms.items()}, reps)
    return dict(params={k: sum(p.numel() for p in m.parameters()) for k,m in ms.items()},
                size={k: (d/f'{k}.pkl').stat().st_size for k in ('cds', 'plain')}, lat=t.median,
                train_params=sum(p.numel() for p in r['cds'].model.parameters()))

# ---------------------------------------------------------------- report
def ok(v:bool)->str: return 'yes' if v else '**no**'

@call_parse
def main(
    n:int=32, # images per step (CDS makes 2N views of them)
    reps:int=10, # measured steps (or forwards) per variant, after the warm-up
    warmup:int=2, # unmeasured rounds first
    threads:int=1, # torch intra-op threads
    view_bs:int=256, # batch size of the two-view throughput test
    view_batches:int=8, # batches per pass of the throughput test
    rounds:int=3, # passes of the throughput test (the best counts)
    profile_top:int=12, # rows of the torch.profiler op table for the CDS and plain-2N steps (0: none)
    models:str='', # comma-separated subset of: cifar, imagenet (default: both)
    compiled:str='cifar', # the models also measured compiled (inductor; minutes to compile on a CPU): cifar, imagenet, both comma-separated, or ''
    loader_batches:int=20, # batches of 128 per pass of the whole-loader comparison
):
    "Print markdown tables of the cost of CDS: step time, memory, view throughput, export"
    warnings.filterwarnings('ignore')
    torch.set_num_threads(threads)
    sel = [k for k,flag in zip(MODELS, ('cifar', 'imagenet')) if not models or flag in models.split(',')]
    print(f"machine: CPU, {os.cpu_count()} cores shared with other work, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}; medians of {reps} interleaved steps after {warmup} warm-up rounds\n")
    flags = dict(zip(MODELS, ('cifar', 'imagenet')))
    results = [bench_steps(k, *MODELS[k], n, reps, warmup, profile_top, flags[k] in compiled.split(',')) for k in sel]

    print("### (a) training step: CDS vs plain\n")
    print("| model | CDS step ms | plain 2N ms | plain N ms | CDS / plain 2N (goal <= 1.06) | same, fastest steps | CDS / plain N | "
          "peak memory CDS / plain 2N (goal <= 1.15) | CDS / plain N |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        (c, p2, p1), (bc, b2) = [r['med'][k] for k in STEPS[:3]], [r['best'][k] for k in STEPS[:2]]
        mc, m2, m1 = [r['mem'][k] for k in STEPS[:3]]
        print(f"| {r['name']}, N={r['n']} | {c:.0f} | {p2:.0f} | {p1:.0f} | {c/p2:.3f} ({ok(c/p2 <= 1.06)}) | {bc/b2:.3f} | {c/p1:.2f} | "
              f"{mc/m2:.3f} ({ok(mc/m2 <= 1.15)}; {mc/2**20:.0f} / {m2/2**20:.0f} MiB) | {mc/m1:.2f} |")
    for r in results:
        if not r['compiled']: continue
        cc, pc, ce = r['med']['CDS compiled'], r['med']['plain 2N compiled'], r['med'][STEPS[0]]
        print(f"\nCompiled (`CompileCallback()`, inductor), {r['name']}, N={r['n']}, same rounds: CDS {cc:.0f} ms, plain 2N {pc:.0f} ms, "
              f"**CDS / plain 2N compiled {cc/pc:.3f}** (eager {ce/r['med'][STEPS[1]]:.3f}); compiled CDS step / eager CDS step {cc/ce:.3f}")
    print("\nStep times: medians (and the ratio of the fastest steps) of the interleaved rounds. Peak memory = parameters + "
          "gradients + optimizer state + batch + the peak of torch.profiler's per-op CPU allocations during one step "
          "(`profile_memory=True`).\n")
    print("Other settings of CDSCallback, in the same interleaved rounds: `head='mlp'` (pool, Linear-ReLU-Linear; not the "
          "paper's sep-conv heads) and `head=partial(SepConvHead, checkpoint=True)` (the sep-conv heads recompute their activations in the backward pass):\n")
    print("| model | setting | step ms | step / plain 2N | peak memory / plain 2N |\n|---|---|---|---|---|")
    for r in results:
        for k in OPTIONS:
            print(f"| {r['name']}, N={r['n']} | {k} | {r['med'][k]:.0f} | {r['med'][k]/r['med'][STEPS[1]]:.3f} | {r['mem'][k]/r['mem'][STEPS[1]]:.3f} |")
    print()
    print("Where the CDS step's time beyond the plain-2N floor goes: each part alone on the 2N views (forward + backward), "
          "timed in the same interleaved rounds (median ms):\n")
    for r in results:
        extra = r['med'][STEPS[0]] - r['med'][STEPS[1]]
        parts = {k: r['med'][k] for k in r['parts']}
        print(f"| {r['name']}: part | ms | share of plain 2N |\n|---|---|---|")
        print(f"| CDS step - plain 2N step | {extra:.0f} | {extra/r['med'][STEPS[1]]:.1%} |")
        for k,v in parts.items(): print(f"| {k} | {v:.1f} | {v/r['med'][STEPS[1]]:.1%} |")
        rest = extra - sum(parts.values())
        print(f"| rest: the difference of noisy medians (`bench/step_parts.py` times the parts of a step: the heads are the whole gap) | {rest:.0f} | {rest/r['med'][STEPS[1]]:.1%} |\n")
    for r in results:
        for k, tab in r['prof']:
            print(f"\ntorch.profiler, one step of {k}, {r['name']} (top ops by self CPU time):\n```\n{tab}\n```")

    print("\n### (b) two-view augmentation throughput (32x32 RGB, both views, normalised)\n")
    v, per_tfm, tab = bench_views(32, view_bs, view_batches, rounds)
    pil = max(val for k,val in v.items() if k.startswith('PIL'))
    print(f"| pipeline (batch {view_bs}) | images/s | vs best PIL |\n|---|---|---|")
    for k,val in v.items(): print(f"| {k} | {val:,.0f} | {val/pil:.2f}x |")
    lo = bench_loaders(128, loader_batches, rounds)
    print(f"\nThe whole two-view CIFAR loader (batch 128, {128*loader_batches} images per pass, best of {rounds}), the reference with 0 and 2 "
          "worker processes, ours in the main process (a batch is one indexing): ours keeps the images in memory as one uint8 tensor (`tensor_dls`) and makes both reference views on the batch "
          "(`reference_views('cifar')`, `two_view_dl`); the reference's (CIFAR/train.py) keeps uint8 arrays and runs `TwoCropTransform` "
          "per item in PIL (crop with padding, flip, Cutout; crop, flip, grouped jitter p=0.8, grayscale 0.2).\n")
    print("| reference's worker processes | ours (main process: no workers needed), images/s | reference per-item PIL, images/s | ours / reference (goal >= 5x) |\n|---|---|---|---|")
    for nw, v in lo.items(): print(f"| {nw} | {v['ours']:,.0f} | {v['reference']:,.0f} | {v['ours']/v['reference']:.2f}x ({ok(v['ours']/v['reference'] >= 5)}) |")
    print(f"\nWhere our views' time goes: each batch transform alone on a batch of {view_bs} (ms, median):\n")
    print("| view | transform | ms |\n|---|---|---|")
    for view, nm, ms in per_tfm: print(f"| {view} | {nm} | {ms:.1f} |")
    print(f"\ntorch.profiler, the two-view batch transform (top ops by self CPU time):\n```\n{tab}\n```")

    print("\n### (c) exported CDS learner vs exported plain learner\n")
    print("| model | params (CDS export / plain) | params while training CDS | file size ratio | inference latency ratio CDS / plain "
          "(goal 1.00 ± 0.02) | A/A control: plain / same plain file loaded again |")
    print("|---|---|---|---|---|---|")
    for r in results:
        e = bench_export(r, max(reps, 20))
        lat, aa = e['lat']['cds']/e['lat']['plain'], e['lat']['plain again']/e['lat']['plain']
        print(f"| {r['name']}, N={r['n']} | {e['params']['cds']:,} / {e['params']['plain']:,} | {e['train_params']:,} | "
              f"{e['size']['cds']/e['size']['plain']:.4f} | {lat:.3f} ({e['lat']['cds']:.1f} / {e['lat']['plain']:.1f} ms; "
              f"{ok(abs(lat-1) <= 0.02)}) | {aa:.3f} |")
