"""CDS under data-parallel training: two CPU processes (gloo), each with the same digits CDS learner.

The heads live inside `learn.model` (`DeepSupervisionModel`), so `DistributedDataParallel` must all-reduce their
gradients: after a few batches on different data, the heads (and the body) are identical on both ranks, and they
did change. Two ways to run it, in the same two processes:

* `fastai`: fastai's own `learn.to_distributed(...)` (`DistributedTrainer` + `DistributedDL`). It needs the
  `accelerate` package (fastai.distributed does not even import without it): skipped when it is missing. Its
  `DistributedDL._broadcast` moves the index list to CUDA (NCCL only); on a CPU the child replaces it with a gloo
  broadcast of a CPU tensor, the only change to fastai.
* `ddp`: a minimal callback of this file wrapping the model in `DistributedDataParallel` and sharding the
  training items, no `accelerate` needed: the same property checked on any machine.

BatchNorm running statistics are not compared: DDP broadcasts rank 0's buffers at the start of every forward, then
each rank updates them with its own batch, so after the last batch they differ by design.
"""
import importlib.util
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2
N_BATCHES = 3  # training batches per variant

CHILD = textwrap.dedent(r"""
    import os, sys, warnings, importlib.util
    from datetime import timedelta
    warnings.filterwarnings('ignore')
    out = sys.argv[1]
    import torch, torch.nn as nn, torch.distributed as dist
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel
    from fastai.vision.all import *
    from fastai_cds.all import *
    rank, ws = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    dist.init_process_group('gloo', timeout=timedelta(seconds=60))

    def net(): return nn.Sequential(ConvLayer(1, 8, stride=2), ConvLayer(8, 16, stride=2), ConvLayer(16, 32, stride=2),
                                    nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(32, 10))

    class Stop(Callback):
        "Record the first training batch (view 1, labels) and stop the fit after N batches"
        order = 100
        def __init__(self, n): self.n, self.first = n, None
        def after_batch(self):
            if not self.training: return
            if self.first is None: self.first = (self.learn.xb[0].detach().clone(), self.learn.yb[0].clone())
            if self.train_iter >= self.n: raise CancelFitException()  # train_iter: batches done

    def make_learner():
        set_seed(0)  # the same learner (split, weights, heads) on every rank
        dls = digits_dls(device="cpu", size=16, label_fraction=0.3, bs=16, seed=0)
        stop = Stop(int(sys.argv[2]))
        learn = Learner(dls, net(), cbs=[CDSCallback(verbose=False), stop])
        learn.remove_cb(ProgressCallback)
        return learn, stop

    def run(learn, stop, idxs):
        h0 = {k: v.clone() for k, v in learn.model.heads.state_dict().items()}
        b0 = {k: v.clone() for k, v in learn.model.model.state_dict().items()}
        set_seed(100 + rank)  # each rank its own augmentation draws
        learn.fit(1, 1e-2)
        ds = learn.model
        assert isinstance(ds, DeepSupervisionModel), type(ds)  # unwrapped again after the fit
        return dict(h0=h0, b0=b0, heads=ds.heads.state_dict(), body=ds.model.state_dict(),
                    heads_named=[n for n, _ in ds.heads.named_parameters()],
                    idxs=idxs, first=stop.first, n_items=len(learn.dls.train.dataset),
                    contra=[float(t) for t in learn.loss_terms.history['contra_0']])

    res = {}
    # ---- fastai's DistributedTrainer (needs accelerate)
    if importlib.util.find_spec('accelerate') is None: res['fastai'] = 'accelerate is not installed'
    else:
        from fastai.distributed import DistributedDL
        def _broadcast(self, t, r):  # fastai's moves `t` to CUDA (NCCL only): gloo on a CPU tensor
            t = torch.tensor(t, dtype=torch.long)
            dist.broadcast(t, r)
            return t.tolist()
        DistributedDL._broadcast = _broadcast
        seen, _get_idxs = [], DistributedDL.get_idxs
        def get_idxs(self):
            r = _get_idxs(self)
            seen.append(list(r))
            return r
        DistributedDL.get_idxs = get_idxs
        learn, stop = make_learner()
        learn.to_distributed(sync_bn=False, cpu=True)
        res['fastai'] = run(learn, stop, seen)

    # ---- plain DistributedDataParallel, no accelerate
    class MiniDDP(Callback):
        "DDP around `learn.model` for the fit; each rank trains on its shard of a permutation shared by all ranks"
        order = 11  # after CDSCallback (-5), which has put its two-view dl in `learn.dl`
        def __init__(self): self.seen = []
        def before_fit(self): self.learn.model = DistributedDataParallel(self.learn.model)
        def before_train(self):
            dl = self.learn.dl
            perm = torch.randperm(len(dl.dataset), generator=torch.Generator().manual_seed(self.epoch)).tolist()
            shard = perm[rank::ws]
            self.seen.append(shard)
            dl = dl.new(shuffle=False)
            dl.get_idxs, dl.n = (lambda: shard), len(shard)
            self.learn.dl = dl
        def after_fit(self): self.learn.model = self.learn.model.module

    learn, stop = make_learner()
    ddp = MiniDDP()
    learn.add_cb(ddp)
    res['ddp'] = run(learn, stop, ddp.seen)

    torch.save(res, f'{out}/rank{rank}.pt')
    dist.barrier()
    dist.destroy_process_group()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    "Run the two ranks; their results, rank 0 first"
    d = tmp_path_factory.mktemp("ddp")
    script = d / "child.py"
    script.write_text(CHILD)
    port = str(free_port())
    procs = []
    for r in range(WORLD):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(d), str(N_BATCHES)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def check_ranks(r0, r1):
    # the ranks started from the same heads and body ...
    for k in r0["h0"]:
        assert torch.equal(r0["h0"][k], r1["h0"][k]), k
    # ... trained on different items: disjoint shards, different first batches
    assert len(r0["idxs"]) >= 1 and len(r0["idxs"]) == len(r1["idxs"])
    i0, i1 = set(r0["idxs"][0]), set(r1["idxs"][0])
    assert i0 and i1 and not i0 & i1, "the ranks' shards overlap"
    assert len(i0 | i1) == r0["n_items"], "the shards cover the training set"
    x0, y0 = r0["first"]
    x1, y1 = r1["first"]
    assert x0.shape == x1.shape == (16, 1, 16, 16), "view 1 only: CDSCallback took view 2 for the heads"
    assert not torch.equal(x0, x1)
    # the contrastive terms were computed on every batch of both ranks
    assert len(r0["contra"]) == len(r1["contra"]) == N_BATCHES
    assert r0["contra"] != r1["contra"], "same loss on both ranks: not different data"
    # every head parameter (and every body parameter) is the same on both ranks: gradients were all-reduced ...
    params = set(r0["heads_named"])
    assert params
    for k in params:
        assert torch.equal(r0["heads"][k], r1["heads"][k]), f"head parameter {k} differs between the ranks"
    for k, v in r0["body"].items():
        if "running_" in k:
            continue  # see the module docstring
        assert torch.equal(v, r1["body"][k]), f"body tensor {k} differs between the ranks"
    for k, v in r0["heads"].items():
        if "num_batches_tracked" in k:
            assert torch.equal(v, r1["heads"][k]) and int(v) == N_BATCHES
    # ... and they did train
    changed = [k for k in params if not torch.equal(r0["heads"][k], r0["h0"][k])]
    assert len(changed) == len(params), f"head parameters unchanged: {sorted(params - set(changed))}"
    assert any(not torch.equal(v, r0["b0"][k]) for k, v in r0["body"].items() if "weight" in k)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="fastai.distributed (DistributedTrainer) needs the `accelerate` package")
def test_fastai_distributed_trainer(ranks):
    r0, r1 = (r["fastai"] for r in ranks)
    assert isinstance(r0, dict), r0
    check_ranks(r0, r1)


def test_plain_ddp(ranks):
    r0, r1 = (r["ddp"] for r in ranks)
    check_ranks(r0, r1)
