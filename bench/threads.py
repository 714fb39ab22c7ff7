"""CPU threads on a busy machine: CDS training steps with torch's default thread setting and with the recipes' choice,
on an idle machine and beside two busy processes, side by side.

Each setting lives in its own process (the OpenMP wait policy is read once, when torch loads its OpenMP runtime):
  torch default    torch's threads (one per core), the OpenMP runtime's default wait (idle threads spin a while)
  recipes          what a recipe gets: `fastai_cds.recipe` imported before torch (OMP_WAIT_POLICY=PASSIVE: idle threads
                   sleep), then `cpu_threads()` (torch's thread count kept)
  1 thread         `torch.set_num_threads(1)` (what `--threads 1` does)
One measured step is `--steps` CDS training steps of the quick start's learner (small_cnn, digits at 16 px, batch 32, SimCLR
view 2, Adam): the next batch of the fit's loader (both views made on the batch) and `Learner.one_batch`; the settings are timed in turn, the order rotated every round
(`interleaved_times`), `--reps` rounds, idle first, then beside `--busy` processes each spinning a NumPy matmul
(one thread each). The table gives the median time of a measured step and each setting's ratio to torch's default.

    python bench/threads.py      # its table: bench/out/threads.md (the docs' copy: docs/pages/40_results.md) (11 min on 2 cores at a load of 5-9; "idle": no busy process of its own)
"""
import os, subprocess, sys, textwrap, time
from pathlib import Path
from fastcore.script import call_parse
from fastai_cds.benchmark import interleaved_times

CHILD = textwrap.dedent(r"""
    import sys, time, warnings
    warnings.filterwarnings('ignore')
    mode, steps = sys.argv[1], int(sys.argv[2])
    if mode == 'recipes': import fastai_cds.recipe as recipe  # first, as the recipes import it: before torch
    import torch
    from fastai.vision.all import *
    from fastai_cds.all import *
    from fastai_cds.benchmark import start_training
    if mode == 'recipes': n, why = recipe.cpu_threads()
    if mode == '1 thread': torch.set_num_threads(1)
    set_seed(0)
    dls = digits_dls(size=16, bs=32, label_fraction=1.)
    cds = CDSCallback(view2_tfms=simclr_tfms(n_channels=1, flip=False), verbose=False)
    learn = Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=cds)
    start_training(learn)
    it, i = iter(learn.dl), 0  # the loader of the fit: two views of each image, made on the batch (timed with the step)
    def step():
        global it, i
        b = next(it, None)
        if b is None: it = iter(learn.dl); b = next(it)
        learn.one_batch(i, b); i += 1
    for _ in range(3): step()  # warm-up
    print(f'ready {torch.get_num_threads()}', flush=True)
    for line in sys.stdin:
        for _ in range(steps): step()
        print('done', flush=True)
""")

BUSY = "import numpy as np\na = np.random.rand(256, 256)\nwhile True: a @ a"
ONE_THREAD = {k: '1' for k in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')}
SETTINGS = ('torch default', 'recipes', '1 thread')

class Child:
    "A process holding one setting's learner; `step()` runs `steps` training steps there and waits for them"
    def __init__(self, mode:str, steps:int):
        env = {k: v for k, v in os.environ.items() if k not in ('OMP_WAIT_POLICY', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS')}
        self.p = subprocess.Popen([sys.executable, '-c', CHILD, mode, str(steps)], env={**env, 'PYTHONWARNINGS': 'ignore'},
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert line.startswith('ready'), f'{mode}: the child did not start'
        self.threads = int(line.split()[1])
    def step(self):
        self.p.stdin.write('go\n'); self.p.stdin.flush()
        assert self.p.stdout.readline().startswith('done')
    def close(self):
        self.p.stdin.close(); self.p.wait(timeout=60)

def load_avg()->str: return ' / '.join(f'{v:.1f}' for v in os.getloadavg())

@call_parse
def main(
    steps:int=3, # training steps in one measured step
    reps:int=6, # measured rounds, idle and busy each
    busy:int=2, # busy processes beside the steps
    out:str='bench/out/threads.md', # where the markdown table goes ('': printed only)
):
    "Time CDS training steps under each thread setting, idle and beside busy processes; print and save the table"
    start = time.time()
    children = {k: Child(k, steps) for k in SETTINGS}
    fns = {k: c.step for k, c in children.items()}
    rows, loads = [], {}
    try:
        for phase in ('idle', f'{busy} busy processes'):
            hogs = [] if phase == 'idle' else [subprocess.Popen([sys.executable, '-c', BUSY], env={**os.environ, **ONE_THREAD})
                                                for _ in range(busy)]
            try:
                if hogs: time.sleep(2)  # the hogs running
                t = interleaved_times(fns, reps, warmup=1)
                loads[phase] = load_avg()
            finally:
                for h in hogs: h.kill(); h.wait()
            rows += [(phase, k, children[k].threads, t.median[k], t.ratio(k, 'torch default')) for k in SETTINGS]
            print(f'{phase}: ' + ', '.join(f'{k} {t.median[k]:.0f} ms' for k in SETTINGS) + f' (load {loads[phase]})', flush=True)
    finally:
        for c in children.values(): c.close()
    lines = [f'{steps} CDS training steps of the quick start\'s learner (small_cnn, digits 16 px, batch 32) per measured step, median '
             f'of {reps} rounds, settings interleaved; {os.cpu_count()} cores; load average (1/5/15 min) at the end of each phase: '
             + '; '.join(f'{k} {v}' for k, v in loads.items()) + f'. Whole run {time.time() - start:.0f} s.', '',
             '| machine | setting | threads | median (ms) | / torch default |', '| --- | --- | --- | --- | --- |']
    lines += [f'| {ph} | {k} | {n} | {ms:.0f} | {r:.2f} |' for ph, k, n, ms, r in rows]
    print('\n'.join(lines))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text('\n'.join(lines) + '\n')
