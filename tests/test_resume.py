"""Tests of `fastai_cds.resume`: a checkpoint resumes only the run that wrote it (each differing setting named, the file
left as it was), unreadable files are named, and a checkpoint path that cannot be written fails before the first step."""
import pickle
from pathlib import Path

import pytest
import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat

import fastai_cds.resume as resume
from fastai_cds.cds import CDSCallback
from fastai_cds.resume import CheckpointCallback

from helpers import Spy, no_bar, small_dls, tiny_cnn

RUN = dict(method='cds', supervised=True, arch='tiny_cnn:8', dataset='digits', label_fraction=0.1, epochs=2, bs=8)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    "A checkpoint written by a 1-epoch fit of a CDS learner with the settings `RUN`"
    f = tmp_path_factory.mktemp('ck') / 'run.pth'
    learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[CDSCallback(verbose=False),
                                                                                           CheckpointCallback(f, 1, run=RUN)]))
    learn.fit(1)
    return f


@pytest.mark.parametrize('change', [dict(method='semi'), dict(supervised=False), dict(label_fraction=0.2), dict(arch='tiny_cnn:16'),
                                    dict(epochs=3), dict(bs=16)])
def test_another_runs_settings_are_refused_naming_each(saved, change):
    before = saved.read_bytes()
    k, v = next(iter(change.items()))
    with pytest.raises(ValueError, match=f"{saved} was saved by another run.*{k}: {RUN[k]!r} in the file, {v!r} in this run"):
        CheckpointCallback(saved, resume=True, run={**RUN, **change})
    assert saved.read_bytes() == before  # untouched
    CheckpointCallback(saved, resume=True, run=RUN)  # its own settings: accepted


def test_two_differences_are_both_named(saved):
    with pytest.raises(ValueError) as e: CheckpointCallback(saved, resume=True, run={**RUN, 'method': 'dsn', 'bs': 4})
    assert "bs: 8 in the file, 4 in this run" in str(e.value) and "method: 'cds' in the file, 'dsn' in this run" in str(e.value)


def test_another_number_of_processes_is_refused(saved, monkeypatch):
    monkeypatch.setattr(resume, 'num_distrib', lambda: 2)
    with pytest.raises(ValueError, match="processes: 1 in the file, 2 in this run"): CheckpointCallback(saved, resume=True, run=RUN)


def test_a_file_of_another_model_is_named_not_a_raw_key_list(saved, tmp_path):
    "Same settings given (a user who changed the code, not the flags): the load fails with the file's name, not torch's key list"
    learn = no_bar(Learner(small_dls(), tiny_cnn(widths=(4, 8, 16)), loss_func=CrossEntropyLossFlat(),
                           cbs=[CDSCallback(verbose=False), CheckpointCallback(saved, resume=True, run=RUN)]))
    with pytest.raises(ValueError, match=f"{saved} holds another model than this run.s"): learn.fit(1)


@pytest.mark.parametrize('kind', ['empty', 'truncated', 'text', 'pickle', 'learn.save'])
def test_unreadable_or_foreign_files_are_named(saved, tmp_path, kind):
    f = tmp_path / 'bad.pth'
    if kind == 'empty': f.write_bytes(b'')
    elif kind == 'truncated': f.write_bytes(saved.read_bytes()[:len(saved.read_bytes()) // 2])
    elif kind == 'text': f.write_text('not a checkpoint')
    elif kind == 'pickle': f.write_bytes(pickle.dumps([1, 2, 3]))
    else: torch.save({'model': {}, 'opt': {}}, f)  # fastai's learn.save layout: not a CheckpointCallback state
    before = f.read_bytes()
    with pytest.raises(ValueError, match=f"{f} is not a checkpoint"): CheckpointCallback(f, resume=True, run=RUN)
    assert f.read_bytes() == before


def test_an_unwritable_checkpoint_path_fails_before_the_first_step(tmp_path):
    (tmp_path / 'afile').write_text('x')
    steps = []
    with pytest.raises(NotADirectoryError, match=r"afile is a file, not a folder"):
        learn = no_bar(Learner(small_dls(), tiny_cnn(), loss_func=CrossEntropyLossFlat(),
                               cbs=[CheckpointCallback(tmp_path / 'afile' / 'ck.pth', 1), Spy(after_step=lambda: steps.append(1))]))
        learn.fit(1)
    assert steps == []
    with pytest.raises(IsADirectoryError, match="is a folder: pass a file name"): CheckpointCallback(tmp_path, 1)
