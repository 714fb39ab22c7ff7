"""CDS under distributed data parallel training on CPUs (gloo, 2 processes), through fastai's engine (`distributed`).

Few launches, each checked for several properties (every launch imports torch and fastai twice on a 2-core machine):
* `ranks`: one launch of `CHILD` (2 processes started as torchrun would) for the cross-rank loss and gradients against
  one process on the concatenated batch, identical parameters after steps on different data with a last batch of one
  image, and the sharded unlabelled stream;
* `test_semisup_kill_and_resume`: the semi-supervised recipe launched three times: uninterrupted, SIGKILLed after an
  epoch, resumed (the uninterrupted launch is also the recipe's export check);
* `test_readme_launch`: the README's launch commands as written, `torchrun --nproc_per_node 2 recipes/<recipe>.py --smoke`
  for every recipe (slow) and `accelerate launch --multi_gpu --num_processes 2 recipes/cifar.py --smoke` (on CPUs:
  accelerate's `--cpu` takes its one-process launcher), each saying "2 processes" once and exporting where a smoke run
  does by default (rank 0's temporary folder, read by every process, removed at the end).
BatchNorm running statistics are not compared across ranks: each rank updates them with its own batch, by design.
"""
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from test_recipes import LOADER  # a process where fastai_cds cannot be imported, loading an export

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or importlib.util.find_spec('accelerate') is None,
                                reason="needs torch.distributed with gloo and `accelerate` (fastai.distributed imports it)")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
WS, B, M = 2, 4, 3  # processes; labelled and unlabelled images per process in the cross-rank check
TIMEOUT = 300  # seconds for one launch

CHILD = textwrap.dedent(r"""
    import os, sys, warnings
    warnings.filterwarnings('ignore')
    from pathlib import Path
    import torch, torch.nn as nn, torch.distributed as dist
    torch.set_num_threads(1)
    from fastai.vision.all import *
    from fastai.distributed import DistributedDL
    from fastai_cds.all import *
    from fastai_cds.semi import UnlabelledViews
    out, rank = Path(sys.argv[1]), int(os.environ['RANK'])
    WS, B, M = (int(a) for a in sys.argv[2:5])
    items, _ = digits_items(1)

    def block_dls(train_items, bs, shuffle, size=8):
        "DataLoaders of digits items: `train_items`, 8 validation items; batches normalised only (deterministic)"
        dblock = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), getters=[ItemGetter(0), ItemGetter(1)],
                           splitter=IndexSplitter(list(range(len(train_items), len(train_items) + 8))), item_tfms=Resize(size),
                           batch_tfms=[Normalize.from_stats(*digits_stats(1), cuda=False)])
        return dblock.dataloaders(list(train_items) + items[-8:], bs=bs, shuffle=shuffle, drop_last=False, num_workers=0, device='cpu')

    class FlipAll(Transform):
        "A deterministic view 2: every image mirrored"
        split_idx, order = 0, 30
        def encodes(self, x:TensorImage): return x.flip(-1)

    def head(stage, final): return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(stage.channels, 8), L2Norm())
    def plain_net(): return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))  # no BatchNorm: per-batch statistics

    class FirstStep(Callback):
        "After the first backward: the contrastive terms and every head parameter's gradient (all-reduced under DDP); then stop"
        order = 100
        def __init__(self, cds): self.cds = cds
        def after_backward(self):
            heads = get_model(self.learn.model).heads
            self.contra = [float(v) for k, v in sorted(self.cds.terms.items()) if k.startswith('contra')]
            self.grads = {n: p.grad.detach().clone() for n, p in heads.named_parameters()}
            raise CancelFitException()

    def first_step(supervised, unlabelled, world):
        "One step of a CDS learner on `world` processes' worth of images: (contrastive terms, head gradients)"
        n = WS if world == 1 else 1  # one process: the concatenated batch
        dls = block_dls(items[:WS*B], B*n, shuffle=False)
        udl = block_dls(items[100:100 + WS*M], M*n, shuffle=False).train if unlabelled else None
        set_seed(0)
        cb = CDSCallback(supervised=supervised, view2_tfms=[FlipAll()], head=head, cross_rank=True, unlabelled=udl, verbose=False)
        learn, step = Learner(dls, plain_net(), loss_func=CrossEntropyLossFlat(), cbs=[cb]), FirstStep(cb)
        learn.remove_cb(ProgressCallback)
        with distributed(learn): learn.fit(1, 1e-2, cbs=step)
        return step.contra, step.grads

    CASES = [(s, u) for s in (True, False) for u in (False, True)]
    res = {'reference': {c: first_step(*c, world=1) for c in CASES}}  # one process, before the processes join
    init_distributed()
    res['ranks'] = {c: first_step(*c, world=WS) for c in CASES}

    # ---- different data on each rank; the last batch of each rank holds one image (17 items per rank, batches of 8)
    class Sizes(Callback):
        order = 100
        def before_fit(self): self.sizes = []
        def after_batch(self):
            if self.training: self.sizes.append(len(self.learn.xb[0]))
    dls = block_dls(items[:2*17], 8, shuffle=True, size=16)
    set_seed(0)
    learn, sizes = Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=CDSCallback(verbose=False)), Sizes()
    learn.remove_cb(ProgressCallback)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    seen, _get_idxs = [], DistributedDL.get_idxs
    def get_idxs(self):
        r = _get_idxs(self)
        seen.append(list(r))
        return r
    DistributedDL.get_idxs = get_idxs
    set_seed(100 + rank)  # each rank its own augmentation draws
    with distributed(learn): learn.fit(2, 1e-2, cbs=sizes)
    res['train'] = dict(before=before, after=learn.model.state_dict(), sizes=sizes.sizes, train_iter=learn.train_iter,
                        idxs=seen[0], n_items=len(dls.train_ds), model=type(learn.model).__name__, acc=float(learn.recorder.values[-1][2]))

    # ---- the unlabelled stream, as SemiSupervisedCallback makes it in a fit: two passes of a shuffled loader
    seen.clear()
    with distributed(learn):
        stream = UnlabelledViews(block_dls(items[:40], M, shuffle=True).train.new(drop_last=True), [FlipAll()])
        per_pass = 40//WS//M  # full batches of a rank's 20 images (DistributedDL's len counts the inner loader's batches)
        steps = [stream.next()[:M] for _ in range(2*per_pass)]  # view 1 of each step
    res['stream'] = dict(steps=steps, idxs=list(seen), restarts=stream.restarts, per_pass=per_pass)
    torch.save(res, out/f'rank{rank}.pt')
""")


def free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    "Run `CHILD` on 2 processes (the environment torchrun sets); their results, rank 0 first"
    d = tmp_path_factory.mktemp('ddp')
    (d/'child.py').write_text(CHILD)
    port, procs = str(free_port()), []
    for r in range(WS):
        env = {**ENV, 'RANK': str(r), 'LOCAL_RANK': str(r), 'WORLD_SIZE': str(WS), 'LOCAL_WORLD_SIZE': str(WS),
               'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': port}
        procs.append(subprocess.Popen([sys.executable, str(d/'child.py'), str(d), str(WS), str(B), str(M)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try: logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)): assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(d/f'rank{r}.pt', weights_only=False) for r in range(WS)]


@pytest.mark.parametrize('supervised', [True, False], ids=['supcon', 'simclr'])
@pytest.mark.parametrize('unlabelled', [False, True], ids=['labelled', 'unlabelled'])
def test_cross_rank_equals_one_process(ranks, supervised, unlabelled):
    "Each rank's contrastive terms and all-reduced head gradients are those of one process on the concatenated batch"
    c = (supervised, unlabelled)
    ref_contra, ref_grads = ranks[0]['reference'][c]
    assert len(ref_contra) >= 2 and ref_grads
    for r in ranks:
        contra, grads = r['ranks'][c]
        assert torch.allclose(torch.tensor(contra), torch.tensor(ref_contra), atol=1e-5), (contra, ref_contra)
        assert grads.keys() == ref_grads.keys()
        for k, g in ref_grads.items():
            assert g.abs().sum() > 0, k  # the head did get a gradient
            assert torch.allclose(grads[k], g, atol=1e-5), f"{k}: max diff {(grads[k] - g).abs().max():.2e}"


def test_ddp_trains_to_the_end_with_identical_parameters(ranks):
    r0, r1 = (r['train'] for r in ranks)
    # different data: the two ranks' shards of the first epoch are disjoint and cover the training set
    i0, i1 = set(r0['idxs']), set(r1['idxs'])
    assert not i0 & i1 and len(i0 | i1) == r0['n_items'] == 34
    # every batch trained, the last of each epoch holding one image
    assert r0['sizes'] == r1['sizes'] == [8, 8, 1]*2 and r0['train_iter'] == 6
    assert r0['model'] == 'DeepSupervisionModel'  # DDP's wrapper removed after the fit
    for k, v in r0['after'].items():
        if 'running_' in k: continue  # see the module docstring
        assert torch.equal(v, r1['after'][k]), f"{k} differs between the ranks"
    heads = [k for k in r0['after'] if k.startswith('heads.') and 'weight' in k]  # the heads are in the state (DeepSupervisionModel)
    assert heads and all(not torch.equal(r0['after'][k], r0['before'][k]) for k in heads), "heads did not train"
    assert r0['acc'] == r1['acc']  # the whole validation set's accuracy, on every rank


def test_unlabelled_stream_is_sharded_and_reshuffled(ranks):
    s0, s1 = (r['stream'] for r in ranks)
    assert s0['restarts'] == s1['restarts'] == 1 and len(s0['idxs']) == 2  # two passes
    for step0, step1 in zip(s0['steps'], s1['steps']):  # every step: no image of one rank in the other's batch
        assert not any(torch.equal(a, b) for a in step0 for b in step1)
    assert s0['idxs'][0] != s0['idxs'][1] and s1['idxs'][0] != s1['idxs'][1]  # a new order every pass
    n = s0['per_pass']
    assert not all(torch.equal(a, b) for a, b in zip(s0['steps'][:n], s0['steps'][n:]))


# ---------------------------------------------------------------------------------------------- the recipes, launched
def torchrun(recipe:str, *args, tmpdir:Path|None=None, **kwargs)->subprocess.Popen:
    "`torchrun --nproc_per_node 2 recipes/<recipe> args` (torch's launcher as a module of this Python), in its own process group"
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(WS), '--master_port', str(free_port()),
           str(ROOT/'recipes'/recipe), *map(str, args)]
    env = ENV if tmpdir is None else {**ENV, 'TMPDIR': str(tmpdir)}  # the temporary folders of every process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def finish(p:subprocess.Popen, timeout:int=TIMEOUT)->str:
    "The launch's output once it ended; killed (its whole process group) past `timeout`"
    try: return p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return p.communicate()[0] + f'\n(killed after {timeout} s)'


def loads_without_fastai_cds(fname:Path)->str:
    res = subprocess.run([sys.executable, '-c', LOADER], input=f'{fname}\n', capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    return res.stdout


TABLE = '| dataset '  # the result table's header, printed by rank 0 only


def check_launch(out:str, rc:int, export:Path, tmpdir:Path|None=None):
    assert rc == 0, out[-4000:]
    assert out.count(TABLE) == 1, out[-4000:]  # printed by rank 0 only
    assert out.count('exported the') == 1 and export.is_file()
    assert [p.name for p in export.parent.iterdir() if p.suffix in ('.pkl', '.tmp')] == [export.name]  # one file: rank 0's
    assert loads_without_fastai_cds(export).startswith('[true'), 'the export needs fastai_cds'
    if tmpdir is not None: assert not [p.name for p in tmpdir.iterdir() if p.name.startswith('cds_')], "temporary folders left behind"


@pytest.mark.slow  # three launches of 2 processes, ~2-3 min: run with `pytest -m slow tests/test_parallel.py`
def test_semisup_kill_and_resume(tmp_path):
    "Killed (SIGKILL) after an epoch and resumed: the steps and learning rates of an uninterrupted run, the best over every epoch"
    args = ['--epochs', 5, '--bs', 16, '--label-fraction', 0.05, '--checkpoint-every', 1]
    whole = torchrun('semisup.py', *args, '--checkpoint', tmp_path/'whole.pth', '--export', tmp_path/'semi.pkl')
    check_launch(finish(whole), whole.returncode, tmp_path/'semi.pkl')
    ck = tmp_path/'run.pth'
    killed, kept = torchrun('semisup.py', *args, '--checkpoint', ck, '--export', ''), None
    deadline = time.monotonic() + TIMEOUT
    while killed.poll() is None and time.monotonic() < deadline:  # kill it once it has saved epoch 2 (k=2 epochs done)
        if ck.is_file() and (state := torch.load(ck, weights_only=False))['epoch'] >= 1:
            os.killpg(killed.pid, signal.SIGKILL)
            kept = state
            break
        time.sleep(0.05)
    out = finish(killed)
    assert kept is not None and killed.returncode != 0, f"the run was not killed mid-way:\n{out[-3000:]}"
    assert kept['epoch'] < 4, "killed after its last epoch"
    resumed = torchrun('semisup.py', *args, '--checkpoint', ck, '--resume', '--export', '')
    out = finish(resumed)
    assert resumed.returncode == 0, out[-4000:]
    w, r = torch.load(tmp_path/'whole.pth', weights_only=False), torch.load(ck, weights_only=False)
    assert r['epoch'] == w['epoch'] == 4 and r['train_iter'] == w['train_iter'] == len(w['steps']['lrs'])
    assert torch.allclose(torch.tensor(r['steps']['lrs']), torch.tensor(w['steps']['lrs']), rtol=1e-6)
    rows = r['records'][0]
    assert len(rows) == 5 and rows[:kept['epoch'] + 1] == kept['records'][0]  # the epochs before the kill, as recorded
    acc = r['metric_names'].index('accuracy') - 1  # the rows have no 'epoch' column
    assert r['best']['value'] == max(row[acc] for row in rows)


# ---------------------------------------------------------------------------------------------- the README's launch commands
BIN = Path(sys.executable).parent  # torchrun and accelerate, installed beside this Python
README_LAUNCHES = {  # the commands as the README writes them, run as written from the repository root
    **{r: f'torchrun --nproc_per_node 2 recipes/{r}.py --smoke' for r in ('quickstart', 'semisup', 'cifar', 'imagenet', 'distill',
                                                                            'finegrained')},
    'accelerate': 'accelerate launch --multi_gpu --num_processes 2 recipes/cifar.py --smoke',  # on CPUs too: torch's launcher, gloo
}
FAST_LAUNCHES = ()  # CI's time (a launch takes 30-60 s): `-m slow` runs every launch, the accelerate one included


def keep_exports(tmpdir:Path, dest:Path, stop:threading.Event):
    "Hard-link every export a smoke run writes in its temporary folder (`cds_run_*`) into `dest` before the folder is removed"
    while not stop.is_set():
        for f in tmpdir.glob('cds_run_*/*.pkl'):
            if not (dest/f.name).exists():
                try: os.link(f, dest/f.name)  # the same file, complete once written, kept when the run removes its folder
                except OSError: pass
        time.sleep(0.02)


@pytest.mark.parametrize('launch', [k if k in FAST_LAUNCHES else pytest.param(k, marks=pytest.mark.slow) for k in README_LAUNCHES])
def test_readme_launch(launch, tmp_path):
    "The README's command: '2 processes' said once, one table, one export (in the smoke run's temporary folder) loading without fastai_cds"
    (tmpdir := tmp_path/'tmp').mkdir(); (kept := tmp_path/'kept').mkdir()
    cmd = README_LAUNCHES[launch].split()
    env = {**ENV, 'TMPDIR': str(tmpdir), 'PET_MASTER_PORT': str(free_port())}  # torchrun's --master_port (accelerate finds a free one)
    env.pop('OMP_NUM_THREADS')  # as a user's shell: the launcher sets it
    stop = threading.Event()
    watcher = threading.Thread(target=keep_exports, args=(tmpdir, kept, stop), daemon=True)
    watcher.start()
    p = subprocess.Popen([str(BIN/cmd[0]), *cmd[1:]], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    out = finish(p)
    stop.set(); watcher.join()
    assert p.returncode == 0, out[-4000:]
    said = [l for l in out.splitlines() if re.match(r'\d+ process', l)]  # rank 0 says where it runs, once
    assert len(said) == 1 and said[0].startswith('2 processes on ' + ('cuda:' if torch.cuda.is_available() else 'cpu')), out[-4000:]
    assert out.count(TABLE) == 1, out[-4000:]  # rank 0 only
    said = re.findall(r'exported the [\w ]+ to (\S+\.pkl): a plain', out)
    assert len(said) == 1 and Path(said[0]).is_relative_to(tmpdir), out[-4000:]
    assert [f.name for f in kept.iterdir()] == [Path(said[0]).name]
    assert loads_without_fastai_cds(kept/Path(said[0]).name).startswith('[true'), 'the export needs fastai_cds'
    assert not [f.name for f in tmpdir.iterdir() if f.name.startswith('cds_')], "temporary folders left behind"


# ---------------------------------------------------------------------------------------------- one process
def test_checkpoint_bad_input(tmp_path):
    from fastai_cds.all import CheckpointCallback
    from fastai_cds.recipe import arch_learner, labelled_data
    with pytest.raises(ValueError, match='every must be an int >= 0'): CheckpointCallback(tmp_path/'ck.pth', every=-1)
    with pytest.raises(FileNotFoundError, match='no checkpoint at'): CheckpointCallback(tmp_path/'ck.pth', resume=True)
    dls = labelled_data('digits', 8, 32, label_fraction=0.1)[0]
    learn = arch_learner('cnn:4', dls, cbs=CheckpointCallback(tmp_path/'ck.pth'))
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    saved = (tmp_path/'ck.pth').read_bytes()
    learn = arch_learner('cnn:4', dls, cbs=CheckpointCallback(tmp_path/'ck.pth', resume=True))
    w0 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match='resume with the same number of epochs'), learn.no_bar(), learn.no_logging(): learn.fit(2)
    assert (tmp_path/'ck.pth').read_bytes() == saved  # the checkpoint intact ...
    assert all(torch.equal(v, w0[k]) for k, v in learn.model.state_dict().items())  # ... and the model not loaded
