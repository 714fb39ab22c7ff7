"""Soak test: thousands of CDS training steps with the semi-supervised and distillation paths on, watching for leaks.

A small CNN student learns digits with `CDSCallback(unlabelled=..., teacher=...)` (two views of every labelled image,
two views of 32 unlabelled images per step, a wider CDS teacher distilled into the heads through adapters), validating
every epoch. From step `--warmup` on, it checks after every step that:
- the resident memory (`/proc/self/statm`) grows by less than `--max-growth` % from its value at step `--warmup`;
- the number of hooks on every module (student, heads, adapters, teacher; forward, pre-forward and backward, and
  torch's global ones) is the same as at step `--warmup`;
- no tensor of an earlier batch is alive (weak references to the batch, both views, the unlabelled pairs, the stage
  and head outputs, the teacher's features, the predictions and the loss, taken at each step, must be dead one step
  later, without a garbage collection);
and, at step `--warmup` and at the end, that the number of live tensors outside the per-batch logs (fastai's
`recorder.losses`: one scalar per batch, by design; our `loss_terms.logs`: one tensor per term) does not change.

Prints the figures, then one JSON line; exits with status 1 if a check fails. `python bench/soak.py` (2,000 steps,
27 minutes on a busy 2-core machine); tests/test_soak.py runs a short version. Linux only (`/proc`). Not run by CI.
"""
import gc, json, math, os, sys, time, warnings, weakref
warnings.filterwarnings('ignore', category=FutureWarning, module='torch.jit._script')  # torch.jit.script is deprecated: fastai uses it at import
import torch
from torch.nn.modules import module as torch_module
from fastcore.script import call_parse
from fastai.vision.all import *
from fastai_cds.all import *

def rss_mb()->float:
    "Resident memory of this process, MB (Linux)"
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

def n_hooks(*models:nn.Module)->int:
    "Forward, pre-forward and backward hooks on every module of `models`, and torch's global module hooks"
    M = torch_module
    per = sum(len(d) for m in models for mod in m.modules()
              for d in (mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks, mod._backward_pre_hooks))
    return per + len(M._global_forward_hooks) + len(M._global_forward_pre_hooks) + len(M._global_backward_hooks)

def live_tensors()->int:
    "Tensors the garbage collector tracks (after a collection)"
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no attribute lookup on lazy module proxies

def n_logged(learn:Learner)->int:
    "Tensors of the per-batch logs: fastai's `recorder.losses` (one per batch) and `loss_terms.logs` (one per term) and those they keep alive (a view's base)"
    entries = [*learn.recorder.losses, *(buf for buf, n in learn.loss_terms.logs.values() if buf is not None)]
    return len({id(t) for t in entries} | {id(t._base) for t in entries if t._base is not None})

class Soak(Callback):
    "After every training step from `warmup` on: resident memory, hooks and the tensors of the step before"
    order = 100  # after every callback of fastai_cds and fastai's Recorder
    def __init__(self, steps:int, warmup:int, teacher:nn.Module):
        self.steps, self.warmup, self.teacher, self.step = steps, warmup, teacher, 0
        self.refs, self.alive, self.rss, self.hooks, self.tensors, self.logged = [], [], [], set(), {}, {}

    def _batch_tensors(self)->list:
        "(name, weak reference) of this step's tensors: the batch (both views), the unlabelled pairs, the forward's input, stages, heads, teacher features, prediction, loss"
        learn, cds, dist = self.learn, self.learn.cds, self.learn.distill
        named = [('xb', learn.xb), ('yb', learn.yb), ('pred', [learn.pred]), ('loss_grad', [learn.loss_grad]), ('loss', [learn.loss]),
                 ('cds.pairs', cds.pairs or []), ('cds.ids', cds.ids or [])]
        if cds.taps is not None: named += [('taps.x', [cds.taps.x]), ('taps.stages', cds.taps.stages), ('taps.heads', cds.taps.heads)]
        if dist._t is not None: named += [('teacher logits', [dist._t[0]]), ('teacher features', dist._t[1])]
        return [(n, weakref.ref(t)) for n, ts in named for t in ts if isinstance(t, torch.Tensor)]

    def after_loss(self):
        if self.training: self._refs = self._batch_tensors()

    def after_batch(self):
        if not self.training: return
        self.step += 1
        self.alive.append(sorted({n for n, r in self.refs if r() is not None}))  # the tensors of the step before this one
        self.refs = self._refs
        if self.step >= self.warmup:
            self.rss.append(rss_mb())
            self.hooks.add(n_hooks(self.learn.model, self.teacher))
        if self.step in (self.warmup, self.steps):
            self.tensors[self.step] = live_tensors()
            self.logged[self.step] = n_logged(self.learn)
        if self.step == self.steps: raise CancelFitException()

@call_parse
def main(
    steps:int=2000, # training steps
    warmup:int=200, # the step from which memory, hooks and live tensors are compared
    max_growth:float=2., # largest accepted growth of the resident memory after `warmup`, %
    label_fraction:float=0.5, # labelled share of the training digits; the rest is the unlabelled stream
    bs:int=32, # labelled batch size (the unlabelled stream draws as many)
    width:int=8, # the student's first stage width (the teacher's is twice as wide)
    size:int=16, # image size
    seed:int=0, # the split, the initialisation, the augmentation
    threads:int=1, # torch intra-op threads
    leak:bool=False, # plant leaks (keep every batch, add a hook every step) to see the checks fail
):
    "Train a CDS student with the semi-supervised and distillation paths for `steps` steps; print memory, hooks and tensor figures"
    torch.set_num_threads(threads)
    set_seed(seed, reproducible=True)
    dls, udl = digits_dls(size=size, label_fraction=label_fraction, bs=bs, seed=seed, unlabelled=True, device='cpu')
    v2 = simclr_tfms(n_channels=1, flip=False)
    teacher = Learner(dls, small_cnn(width=2*width), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(view2_tfms=v2, verbose=False))
    learn = Learner(dls, small_cnn(width=width), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    cbs=CDSCallback(unlabelled=udl, teacher=teacher, view2_tfms=v2, verbose=False))
    soak, kept = Soak(steps, warmup, teacher.model), []
    planted = [Callback(after_batch=lambda cb: learn.training and (kept.append(learn.xb[0]), learn.model.register_forward_hook(lambda *_: None)))] if leak else []
    start = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit(math.ceil(steps / len(dls.train)), 1e-3, cbs=[soak, *planted])
    secs = time.time() - start
    if soak.step < steps: sys.exit(f"soak: the fit ended after {soak.step} of {steps} steps")
    # the last batch's tensors once the fit is over: fastai's own `learn.loss_grad` stays (its cleanup clears xb, yb, pred, loss)
    after_fit = sorted({n for n, r in soak._refs if r() is not None} - {'loss_grad'})

    r0, r1, peak = soak.rss[0], soak.rss[-1], max(soak.rss)
    growth, peak_growth = 100 * (r1 - r0) / r0, 100 * (peak - r0) / r0
    old = sorted({n for names in soak.alive for n in names})
    outside = {k: soak.tensors[k] - soak.logged[k] for k in sorted(soak.tensors)}
    (s0, o0), (s1, o1) = outside.items()
    res = dict(steps=steps, warmup=warmup, epochs=learn.epoch + 1, secs=round(secs, 1), rss_mb=[round(r0, 1), round(r1, 1)],
               rss_peak_mb=round(peak, 1), rss_growth_pct=round(growth, 3), rss_peak_growth_pct=round(peak_growth, 3),
               hook_counts=sorted(soak.hooks), old_batch_tensors_alive=old, last_batch_tensors_alive_after_fit=after_fit,
               live_tensors=list(soak.tensors.values()), per_batch_log_tensors=list(soak.logged.values()), live_tensors_outside_logs=[o0, o1])
    checks = {f'resident memory after step {warmup} grows by less than {max_growth} %': peak_growth < max_growth,
              'the same number of hooks at every step': len(soak.hooks) == 1,
              'no tensor of a batch alive one step later': not old,
              'no tensor of the last batch alive after the fit': not after_fit,
              'live tensors outside the per-batch logs: no growth per step': o1 - o0 < (s1 - s0) / 4}
    print(f"soak: {steps} CDS steps (semi-supervised + distillation), {res['epochs']} epochs, {secs:.0f} s")
    print(f"resident memory: {r0:.1f} MB at step {warmup}, {r1:.1f} MB at step {steps} ({growth:+.2f} %), peak {peak:.1f} MB ({peak_growth:+.2f} %)")
    hooks = sorted(soak.hooks)
    print(f"hooks on the student, heads, adapters and teacher: " + (f"{hooks[0]} at every step from {warmup}" if len(hooks) == 1 else
          f"from {hooks[0]} to {hooks[-1]} between step {warmup} and {steps}: they accumulate"))
    print(f"tensors of a batch alive one step later: {', '.join(old) or 'none'} ({len(soak.alive) - 1} steps checked); "
          f"of the last batch after the fit: {', '.join(after_fit) or 'none'}")
    print(f"live tensors: {soak.tensors[s0]} at step {s0}, {soak.tensors[s1]} at step {s1}; of the per-batch logs (fastai's `recorder.losses`, one "
          f"scalar per batch; `loss_terms.logs`, one tensor per term): {soak.logged[s0]}, {soak.logged[s1]}; outside them: {o0}, {o1} ({o1 - o0:+d}; one leaked tensor per step would add {s1 - s0})")
    for name, ok in checks.items(): print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(json.dumps({**res, 'checks': checks}))
    if not all(checks.values()): sys.exit(1)
