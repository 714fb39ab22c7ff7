"""Tests of `fastai_cds.schedule`: the reference step schedule as a fastai schedule."""
import pytest
import torch
from fastai.callback.schedule import ParamScheduler

from fastai_cds.schedule import step_schedule

from helpers import Spy, small_dls, tiny_learner


def test_step_schedule_values():
    "lr, /10 at epochs 90, 180 and 280 of 300"
    lr = 0.1
    f = step_schedule(lr)
    got = [float(f(torch.tensor(p))) for p in (0., 0.29, 0.31, 0.61, 0.95)]
    assert got == pytest.approx([lr, lr, lr / 10, lr / 100, lr / 1000], rel=1e-6)
    g = step_schedule(1., milestones=(1, 2), total=4, gamma=0.5)
    assert [float(g(torch.tensor(p))) for p in (0.2, 0.3, 0.6, 0.99)] == pytest.approx([1., 0.5, 0.25, 0.25])


def test_step_schedule_drives_a_fit():
    "As fastai's ParamScheduler: 8 batches at positions k/8, milestones at 30%, 55%, 80%"
    learn = tiny_learner(small_dls(n_train=64, bs=8))
    lrs = []
    learn.fit(1, cbs=[ParamScheduler({'lr': step_schedule(0.1, milestones=(30, 55, 80), total=100)}),
                      Spy(100, before_batch=lambda: learn.training and lrs.append(learn.opt.hypers[-1]['lr']))])
    assert lrs == pytest.approx([0.1] * 3 + [0.01] * 2 + [0.001] * 2 + [0.0001], rel=1e-6)
