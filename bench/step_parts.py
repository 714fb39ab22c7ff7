"""Where the time of a CDS training step goes, part by part, against a plain step on the same 2N images.

Four steps run in the same rounds (order rotated every round), each timed in process CPU time (the machine is shared:
CPU time of this process is steadier than wall time), medians over `--reps` rounds:
- fastai's CDS step (`Learner.one_batch` with `CDSCallback`: N images, two views, 2N through the network);
- fastai's plain step on the same 2N images (the floor);
- the same CDS step written out by hand, cut into parts: the backbone forward (with the stage hooks and the views'
  concatenation), the heads' forward, the losses, the backward of losses and heads (the graph cut at the stage outputs
  and the logits), the backbone backward with the heads' gradients fed into the stage outputs, the optimizer step;
- the plain step written out the same way (every other round its backward also receives gradients at the stage
  outputs, to see what adding them into the network's gradient costs).
The hand-written steps compute what `CDSCallback` computes (CE on view 1, SupCon on each head); their totals match
fastai's steps, so the parts account for the whole step. CIFAR-style ResNet18, 32x32, CPU. Not run by CI.
"""
import statistics, time, warnings
warnings.filterwarnings('ignore', category=FutureWarning, module='torch.jit._script')  # torch.jit.script is deprecated: fastai uses it at import
import torch, torch.nn.functional as F
from torch import Tensor
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai.callback.hook import hook_outputs
from fastai_cds.all import *
from fastai_cds.benchmark import synthetic_items, image_dls, start_training, interleaved_times

class Parts:
    "Process CPU time of named parts, one list of measures per name"
    def __init__(self): self.t = {}
    def start(self)->float: self.last = time.process_time(); return self.last
    def lap(self, name:str):
        now = time.process_time()
        self.t.setdefault(name, []).append(now - self.last)
        self.last = now
    def total(self, name:str, t0:float): self.t.setdefault(name, []).append(time.process_time() - t0)

def hooked_forward(model:nn.Module, stages:list[str], x:Tensor)->tuple:
    "The output of `model` and of its `stages` (kept in the graph)"
    with hook_outputs([model.get_submodule(s) for s in stages], detach=False, cpu=False) as hk:
        return model(x), [h.stored for h in hk]

@call_parse
def main(
    n:int=32, # images per step (CDS makes 2N views of them)
    reps:int=10, # measured rounds
    warmup:int=2, # unmeasured rounds first
    threads:int=1, # torch intra-op threads
):
    "Print a markdown table: each part of a CDS step and of a plain 2N step, in ms of CPU time and % of fastai's plain 2N step"
    warnings.filterwarnings('ignore')
    torch.set_num_threads(threads)
    set_seed(0)
    dls = image_dls(synthetic_items(4*n, 32), n)
    cds = Learner(dls, cifar_resnet('resnet18', 10), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False))
    plain = Learner(dls, cifar_resnet('resnet18', 10), loss_func=CrossEntropyLossFlat())
    plain.model.load_state_dict(cds.model.model.state_dict())
    for l in (cds, plain): start_training(l)
    x, y = next(iter(cds.dl))  # the two-view batch CDSCallback trains on: 2N images (view 1, view 2), N labels
    x, y = x.as_subclass(Tensor), y.as_subclass(Tensor)
    y2, ds, cb, P = torch.cat([y, y]), cds.model, cds.cds, Parts()
    stage_grads = None

    def cds_by_hand():
        t0 = P.start()
        out, stages = hooked_forward(ds.model, ds.stages, torch.cat([x[:n], x[n:]])); P.lap('CDS: backbone forward (stage hooks, views concatenated)')
        cut = [s.detach().requires_grad_() for s in stages]
        zs = [h(s) for h,s in zip(ds.heads, cut)]; P.lap('CDS: heads forward')
        logits = out.detach().requires_grad_()
        loss = F.cross_entropy(logits[:n], y) + cb.weight*torch.stack([cb.contrastive(z, y) for z in zs]).sum(); P.lap('CDS: losses forward (CE on N, SupCon per head)')
        loss.backward(); P.lap('CDS: losses + heads backward')
        torch.autograd.backward([out, *stages], [logits.grad, *(s.grad for s in cut)]); P.lap("CDS: backbone backward (the heads' gradients into the stages)")
        cds.opt.step(); cds.opt.zero_grad(); P.lap('CDS: optimizer step (head parameters too) + zero_grad')
        P.total('CDS by hand: total', t0)

    def plain_by_hand():
        nonlocal stage_grads
        t0 = P.start()
        out, stages = hooked_forward(plain.model, ds.stages, x); P.lap('plain: backbone forward (stage hooks)')
        logits = out.detach().requires_grad_()
        F.cross_entropy(logits, y2).backward(); P.lap('plain: loss forward + backward')
        if stage_grads is None: stage_grads = [torch.randn_like(s)*1e-3 for s in stages]
        if len(P.t.get('plain by hand: total', [])) % 2:
            torch.autograd.backward([out, *stages], [logits.grad, *stage_grads]); P.lap('plain: backbone backward, gradients fed into the stages')
        else: out.backward(logits.grad); P.lap('plain: backbone backward')
        plain.opt.step(); plain.opt.zero_grad(); P.lap('plain: optimizer step + zero_grad')
        P.total('plain by hand: total', t0)

    fns = {"fastai CDS step": lambda: cds.one_batch(0, (x, y)), "fastai plain 2N step": lambda: plain.one_batch(0, (x, y2)),
           'CDS by hand': cds_by_hand, 'plain by hand': plain_by_hand}
    interleaved_times(fns, warmup, 0)  # the warm-up rounds
    P.t.clear()
    t = interleaved_times(fns, reps, 0, clock=time.process_time)  # the hand-written steps time their parts themselves
    med = {**{k: statistics.median(v)*1000 for k,v in P.t.items()}, **{k: t.median[k] for k in list(fns)[:2]}}
    ref = med['fastai plain 2N step']
    print(f"CIFAR-style ResNet18 32x32, N={n} (2N={2*n} through the network), {torch.get_num_threads()} thread(s), CPU time, "
          f"medians of {reps} interleaved rounds\n")
    print("| part | ms | % of fastai's plain 2N step |\n|---|---|---|")
    for k,v in med.items(): print(f"| {k} | {v:.1f} | {v/ref:.1%} |")
    print(f"\nCDS / plain 2N (fastai steps): {med['fastai CDS step']/ref:.3f}; heads forward + backward: "
          f"{(med['CDS: heads forward'] + med['CDS: losses + heads backward'])/ref:.1%} of the plain step")
