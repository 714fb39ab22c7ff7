"""Tests of `fastai_cds.recipe`, what the recipes share:
datasets from a local folder or a download (and the messages when neither works), labelled fractions, learners by
architecture name, the fine-grained layouts, the smoke folder, result tables and the export check, the shared options
(`RecipeRun`, `recipe_options`) and the CLI layer (one line for an error a user can fix, a traceback for a bug)."""
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.data.external import URLs
from fastai.torch_core import default_device
from fastcore.docments import docments
from fastcore.script import CliError
from PIL import Image

import fastai_cds.recipe as recipe
from fastai_cds.recipe import (RecipeRun, arch_learner, dataset_path, export_and_check, folder_dls, labelled_data, print_table,
                               recipe_options, result_row, smoke_folder, split_table, url_of)

from fastai_cds.architectures import cifar_model
from fastai_cds.views import Cutout
from helpers import manual_valid, ours, small_dls, tiny_cnn, tiny_learner


def ours_before(learn): return [type(t).__name__ for t in learn.dls.after_batch.fs if type(t).__module__.startswith('fastai_cds')]

pytestmark = pytest.mark.usefixtures('seeded')  # set_seed(0) before every test (conftest.py)


# ---------------------------------------------------------------- dataset_path, url_of
def test_dataset_path_local_folder_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, 'untar_data', lambda *a, **k: pytest.fail('downloaded although a folder was given'))
    assert dataset_path('cifar10', tmp_path) == tmp_path
    assert dataset_path('dogs', str(tmp_path)) == tmp_path  # no download for it: the folder is all there is
    assert dataset_path('my_own_data', tmp_path) == tmp_path  # any name, with its folder


def test_dataset_path_messages(tmp_path, monkeypatch):
    "Python's errors, each naming the fix: the recipes' CLI layer prints them in one line"
    with pytest.raises(ValueError, match=r"Stanford Dogs is not among fastai's datasets: download it yourself and pass its folder with --path"):
        dataset_path('dogs')
    with pytest.raises(FileNotFoundError, match=re.escape(f"--path {tmp_path / 'nope'}: no such folder")):
        dataset_path('cifar10', tmp_path / 'nope')
    with pytest.raises(ValueError, match=r"--dataset CIFAR-10: not one of cifar10, cifar100, .* nor a fastai URLs name"):
        dataset_path('CIFAR-10')
    def offline(url, *a, **k): raise URLError('no network')
    monkeypatch.setattr(recipe, 'untar_data', offline)
    with pytest.raises(ConnectionError, match=r"Could not download CIFAR-100 from .*URLError.*no network.*pass the folder with --path "
                                              r"\(train/ and test/ folders, one subfolder per class\)") as e:
        dataset_path('cifar100')
    assert URLs.CIFAR_100 in str(e.value) and '\n' not in str(e.value)


def test_dataset_path_downloads_with_fastai(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, 'untar_data', lambda url: calls.append(url) or tmp_path)
    assert dataset_path('cifar10') == tmp_path and dataset_path('imagenette_160') == tmp_path and dataset_path('cub') == tmp_path
    assert calls == [URLs.CIFAR, URLs.IMAGENETTE_160, URLs.CUB_200_2011]


def test_url_of():
    assert url_of('cifar') == URLs.CIFAR and url_of('imagenette_160') == URLs.IMAGENETTE_160
    assert url_of('not_a_dataset') is None and url_of('local_path') is None  # `URLs.LOCAL_PATH` is a folder, not a URL


# ---------------------------------------------------------------- smoke_folder, folder_dls
@pytest.mark.parametrize('valid', ['valid', 'val'])
def test_smoke_folder_layout(valid):
    root = smoke_folder(12, valid=valid, n_train=3, n_valid=2)
    assert root.is_dir() and sorted(p.name for p in root.iterdir()) == sorted(['train', valid])
    for split, n in (('train', 3), (valid, 2)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == [str(k) for k in range(10)]
        for c in classes:
            files = sorted((root / split / c).glob('*.png'))
            assert len(files) == n
            with Image.open(files[0]) as im: assert im.size == (12, 12) and im.mode == 'RGB'
    dls = folder_dls(root, size=12, bs=4)
    assert dls.c == 10 and len(dls.train_ds) == 30 and len(dls.valid_ds) == 20
    assert dls.one_batch()[0].shape == (4, 3, 12, 12)


def test_folder_dls_needs_train_and_valid(tmp_path):
    (tmp_path / 'train').mkdir()
    with pytest.raises(FileNotFoundError, match='no train/ and valid/, val/ or test/ folders'): folder_dls(tmp_path, 8, 2)


# ---------------------------------------------------------------- tables, report, export check
def test_print_table(capsys):
    print_table({'method': 'cds', 'top-1 (%)': '81.20', 'x': 3})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ['| method | top-1 (%) | x |', '| ------ | --------- | - |', '| cds    | 81.20     | 3 |']
    print_table([{'method': 'base', 'top-1 (%)': '77.45'}, {'method': 'cds', 'top-1 (%)': '80.84', 'paper top-1 (%)': '80.84'}])
    assert capsys.readouterr().out.splitlines() == [  # a column for every key of any row, empty where a row has none
        '| method | top-1 (%) | paper top-1 (%) |', '| ------ | --------- | --------------- |',
        '| base   | 77.45     |                 |', '| cds    | 80.84     | 80.84           |']


def test_result_row_numbers_are_the_learners():
    learn = tiny_learner(small_dls())
    logits, ys = manual_valid(learn)
    row = result_row(learn, {'method': 'cds'}, paper=80.84, secs=3.)
    assert list(row)[:2] == ['method', 'top-1 (%)'] and row['method'] == 'cds'
    assert row['paper top-1 (%)'] == '80.84' and row['train time'] == '3.0 s'
    assert 'paper top-1 (%)' not in result_row(learn, {'method': 'cds'})  # no paper number: no column
    assert float(row['top-1 (%)']) == pytest.approx((logits.argmax(1) == ys).float().mean().item() * 100, abs=0.006)
    assert float(row['valid loss']) == pytest.approx(F.cross_entropy(logits, ys).item(), abs=6e-5)
    assert 0 <= float(row['ECE (%)']) <= 100


def test_export_and_check(tmp_path, capsys):
    learn = tiny_learner(small_dls())
    export_and_check(learn, tmp_path / 'm.pkl', what='student')
    out = capsys.readouterr().out
    n = sum(p.numel() for p in tiny_cnn().parameters())
    assert f"exported the student to {tmp_path / 'm.pkl'}: a plain Sequential, {n:,} parameters" in out
    assert Path(tmp_path / 'm.pkl').exists() and not ours(tmp_path / 'm.pkl')


def test_export_and_check_a_baseline_with_our_transforms(tmp_path):
    "A baseline (no callback of ours on the Learner) whose DataLoaders carry our transforms still exports a plain Learner"
    dls = small_dls()
    dls.after_batch.add(Cutout(4))
    learn = tiny_learner(dls, cds=[])
    assert ours_before(learn) and not any(type(cb).__module__.startswith('fastai_cds') for cb in learn.cbs)
    export_and_check(learn, tmp_path / 'm.pkl')
    assert not ours(tmp_path / 'm.pkl') and ours_before(learn)  # and `learn` keeps them


# ---------------------------------------------------------------- data of the semi-supervised and distillation recipes
def test_labelled_data_digits_fraction_and_rest():
    dls, udl = labelled_data('digits', 16, 16, label_fraction=0.1, seed=0, unlabelled_bs=8)
    assert udl.bs == 8 and len(dls.train_ds) + len(udl.dataset) == 1438  # the training part of digits_splits
    assert labelled_data('digits', 16, 16)[1] is None  # every label kept: no unlabelled loader


def test_labelled_data_unknown_dataset(tmp_path):
    "--dataset neither digits, one of ours nor a fastai URLs name: one message, no download tried; the digits take no --path"
    with pytest.raises(ValueError, match='--dataset cifar_10: not one of'): labelled_data('cifar_10', 16, 16)
    with pytest.raises(ValueError, match='the digits are embedded'): labelled_data('digits', 16, 16, path=tmp_path)


def test_arch_learner_small_cnn_and_torchvision():
    dls = labelled_data('digits', 16, 16)[0]
    learn = arch_learner('cnn:8', dls)
    assert [m.out_channels for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d)][:3] == [8, 8, 16]
    learn = arch_learner('resnet18', dls)
    assert learn.model[0][0].in_channels == 1 and learn.model[-1][-1].out_features == 10  # the digits' 1 channel, 10 classes
    with pytest.raises(ValueError, match='--arch resnet19: .*did you mean resnet18'): arch_learner('resnet19', dls)


# ---------------------------------------------------------------- fine-grained layouts (`split_table`)
def touch(path:Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'')


def test_layout_imagenet_style(tmp_path):
    for s, n in (('train', 3), ('val', 1)):
        for c in ('cat', 'dog'):
            for k in range(n): touch(tmp_path/s/c/f'{k}.jpg')
    df = split_table(tmp_path)
    assert len(df) == 8 and df.is_valid.sum() == 2 and set(df.label) == {'cat', 'dog'}
    assert all((tmp_path/f).exists() for f in df.file)


def test_layout_cub(tmp_path):
    "CUB's official split files, inside the CUB_200_2011/ folder of fastai's archive"
    root = tmp_path/'CUB_200_2011'
    ims = ['001.Albatross/a_1.jpg', '001.Albatross/a_2.jpg', '002.Auklet/b_1.jpg', '002.Auklet/b_2.jpg']
    for f in ims: touch(root/'images'/f)
    (root/'images.txt').write_text(''.join(f'{i+1} {f}\n' for i, f in enumerate(ims)))
    (root/'train_test_split.txt').write_text('1 1\n2 0\n3 1\n4 0\n')
    df = split_table(tmp_path)
    assert list(df.label) == ['001.Albatross', '001.Albatross', '002.Auklet', '002.Auklet']
    assert list(df.is_valid) == [False, True, False, True] and all((tmp_path/f).exists() for f in df.file)


def test_layout_split_lists(tmp_path):
    "fastai's Oxford Flowers-102: jpg/ with train.txt, valid.txt (both training) and test.txt (validation)"
    for k in range(6): touch(tmp_path/'jpg'/f'image_{k}.jpg')
    (tmp_path/'train.txt').write_text('jpg/image_0.jpg 0\njpg/image_1.jpg 1\n')
    (tmp_path/'valid.txt').write_text('jpg/image_2.jpg 0\njpg/image_3.jpg 1\n')
    (tmp_path/'test.txt').write_text('jpg/image_4.jpg 0\njpg/image_5.jpg 1\n')
    df = split_table(tmp_path)
    assert list(df.is_valid) == [False]*4 + [True]*2 and list(df.label) == ['0', '1']*3


def test_layout_cars_annos(tmp_path):
    "Stanford Cars' cars_annos.mat: relative_im_path, class (1-based into class_names), test flag"
    import numpy as np
    from scipy.io import savemat
    rec = np.zeros(4, dtype=[('relative_im_path', 'O'), ('class', 'O'), ('test', 'O')])
    for k in range(4):
        rec[k] = (f'car_ims/{k:06d}.jpg', k % 2 + 1, k // 2)
        touch(tmp_path/'car_ims'/f'{k:06d}.jpg')
    savemat(tmp_path/'cars_annos.mat', {'annotations': rec, 'class_names': np.array(['Audi TT', 'BMW M3'], dtype=object)})
    df = split_table(tmp_path)
    assert list(df.label) == ['Audi TT', 'BMW M3']*2 and list(df.is_valid) == [False, False, True, True]


def test_layout_unknown(tmp_path):
    touch(tmp_path/'images'/'x.jpg')
    with pytest.raises(ValueError, match='ImageNet-style'): split_table(tmp_path)


# ---------------------------------------------------------------- the paper's numbers and the best epoch
def test_paper_tables_match_the_paper():
    "Tables 1-3 (CIFAR-100, CIFAR-10, ImageNet), 5-6 (fine-grained, ResNet50) and 7-8 (distillation), typed in from ../shared/cds-method.md"
    from fastai_cds.recipe import PAPER_TOP1, paper_top1
    from fastai_cds.architectures import CIFAR_ARCHS
    m = ('base', 'dsn', 'dks', 'dhm', 'cds')
    tables = {
        ('cifar100', 'resnet18'): (77.45, 78.30, 78.96, 78.82, 80.84), ('cifar100', 'resnet50'): (77.81, 78.96, 80.95, 81.12, 81.31),
        ('cifar100', 'resnet101'): (78.65, 79.37, 81.39, 81.27, 83.12), ('cifar100', 'resnext50'): (79.85, 81.02, 82.27, 82.14, 82.81),
        ('cifar100', 'resnext101'): (80.67, 81.70, 82.98, 83.27, 83.87), ('cifar100', 'wrn50'): (79.46, 80.98, 81.95, 81.76, 82.28),
        ('cifar100', 'wrn101'): (79.98, 81.30, 82.58, 82.76, 83.93), ('cifar100', 'senet18'): (77.46, 78.28, 79.32, 79.14, 80.13),
        ('cifar100', 'senet50'): (78.02, 79.46, 80.76, 80.72, 81.51), ('cifar100', 'preactresnet18'): (76.84, 77.40, 78.96, 78.32, 80.76),
        ('cifar10', 'resnet18'): (94.96, 95.31, 95.72, 95.61, 96.49), ('cifar10', 'resnet50'): (95.07, 95.41, 95.90, 95.87, 96.78),
        ('cifar10', 'resnet101'): (95.13, 95.63, 96.21, 96.04, 97.02), ('cifar10', 'resnext50'): (95.09, 95.39, 95.98, 96.10, 96.76),
        ('cifar10', 'resnext101'): (95.34, 95.70, 96.10, 96.27, 97.05), ('cifar10', 'wrn50'): (95.01, 95.27, 95.50, 95.62, 96.88),
        ('cifar10', 'wrn101'): (95.27, 95.78, 96.12, 96.31, 97.01), ('cifar10', 'senet18'): (94.86, 95.21, 95.74, 95.59, 96.50),
        ('cifar10', 'senet50'): (95.11, 95.41, 95.72, 95.77, 96.73), ('cifar10', 'preactresnet18'): (94.78, 95.13, 95.47, 95.38, 96.37),
        ('imagenet', 'resnet18'): (69.21, 69.54, 71.32, 71.29, 72.85), ('imagenet', 'resnet34'): (73.17, 73.29, 74.01, 73.89, 76.19),
        ('imagenet', 'resnet50'): (75.30, 75.37, 76.47, 76.57, 78.25),
        ('cub', 'resnet50', 'scratch'): (60.65, 62.37, 63.59, 64.01, 64.65), ('cub', 'resnet50', 'pretrained'): (78.50, 80.14, 81.34, 81.27, 82.10),
        ('cars', 'resnet50', 'scratch'): (79.86, 81.04, 81.52, 81.49, 82.07), ('cars', 'resnet50', 'pretrained'): (90.25, 91.32, 92.54, 92.31, 92.90),
        ('flowers', 'resnet50', 'scratch'): (87.52, 88.54, 88.94, 89.03, 89.26), ('flowers', 'resnet50', 'pretrained'): (97.68, 98.64, 99.01, 98.84, 99.39),
        ('dogs', 'resnet50', 'scratch'): (64.00, 66.32, 68.31, 68.38, 69.02), ('dogs', 'resnet50', 'pretrained'): (76.47, 77.21, 78.32, 78.20, 80.99),
        ('aircraft', 'resnet50', 'scratch'): (74.07, 74.49, 75.07, 75.00, 75.43), ('aircraft', 'resnet50', 'pretrained'): (87.43, 89.31, 89.20, 89.57, 90.52),
    }
    kd = ('student', 'kd', 'fitnet', 'at', 'rkd', 'sp', 'crd', 'cds+kd')  # Table 8 (CIFAR): Base, KD, FitNet, AT, RKD, SP, CRD, CDS+KD
    distill = {  # a few rows of Table 8 typed in whole (each column once at least), and the checks below for every row
        ('cifar100', 'resnet18'): (77.45, 78.68, 78.15, 78.09, 78.21, 78.19, 81.41, 83.31),
        ('cifar10', 'resnext50'): (95.09, 95.27, 95.36, 95.68, 95.59, 95.37, 96.49, 97.15),
        ('cifar100', 'shufflenetv1'): (72.46, 74.08, 74.19, 74.11, 74.56, 74.68, 75.11, 75.77),
        ('cifar10', 'preactresnet50'): (94.89, 95.21, 95.57, 95.49, 95.37, 95.48, 96.11, 96.93)}
    imagenet_kd = {'resnet18': (69.21, 70.52, 70.74, 70.63, 70.61, 71.07, 73.23),
                   'resnet34': (73.17, 74.44, 74.69, 74.61, 74.60, 74.99, 76.65), 'resnet50': (75.30, 76.62, 76.79, 76.92, 76.88, 77.21, 78.68)}  # Table 7: no FitNet
    assert set(PAPER_TOP1) == set(tables) | {(d, a, 'distill') for d in ('cifar10', 'cifar100') for a in CIFAR_ARCHS} | {
        ('imagenet', a, 'distill') for a in imagenet_kd}
    for setting, numbers in distill.items():
        assert [paper_top1(*setting, 'distill', method=k) for k in kd] == list(numbers), setting
    for arch, numbers in imagenet_kd.items():
        assert [paper_top1('imagenet', arch, 'distill', method=k) for k in kd if k != 'fitnet'] == list(numbers), arch
        assert paper_top1('imagenet', arch, 'distill', method='fitnet') is None
    for d in ('cifar10', 'cifar100'):
        for a in CIFAR_ARCHS:  # every Table 8 row: all eight columns; Base is Table 1/2's baseline where both have the network
            row = PAPER_TOP1[(d, a, 'distill')]
            assert list(row) == list(kd) and row['student'] < row['kd'] < row['cds+kd'] and max(row.values()) == row['cds+kd'], (d, a)
            if (d, a) in tables: assert row['student'] == tables[(d, a)][0], (d, a)
    for setting, numbers in tables.items():
        assert [paper_top1(*setting, method=k) for k in m] == list(numbers), setting
    assert paper_top1('cub', 'resnet50', method='cds') is None  # the fine-grained tables need the setting


# ---------------------------------------------------------------- the shared options and the CLI layer
def example_recipe(**options):
    "A recipe's `main` as the recipes write it (its own option `lr`, the shared ones), defined here: this file is its source"
    @recipe_options(**options)
    def main(
        lr:float=0.1, # learning rate
        **kwargs):
        "An example recipe"
        if lr < 0: raise ValueError(f"--lr {lr}: a learning rate is positive,\n\tpass one")  # a check of ours
        if lr == 7: raise TypeError("a bug")
        if lr == 8: json.loads('not json')  # a ValueError of another library
        return lr, kwargs
    return main


def test_recipe_options_signature_and_help():
    "The recipe's own option first, then every option of `RecipeRun` with its docments as help; `but` drops some, defaults change"
    shared = {k: v for k, v in docments(RecipeRun, full=True).items() if k not in ('self', 'name', 'command', 'return')}
    main = example_recipe()
    help_ = docments(main, full=True, eval_str=True)
    assert list(inspect.signature(main).parameters) == ['lr', *shared]
    assert help_['lr'].docment == 'learning rate'
    assert all(help_[k].docment == v.docment and v.docment and help_[k].default == v.default for k, v in shared.items())
    main = example_recipe(but='path workers', pretrained=True, wd=5e-4)
    params = inspect.signature(main).parameters
    assert 'path' not in params and 'workers' not in params and params['pretrained'].default is True and params['wd'].default == 5e-4
    lr, kwargs = main()  # a Python call: the recipe's defaults, as from the command line
    assert lr == 0.1 and kwargs['pretrained'] is True and kwargs['wd'] == 5e-4 and kwargs['seed'] == shared['seed'].default
    with pytest.raises(TypeError, match='no shared option lr_max'): example_recipe(lr_max=1)


def test_cli_layer_one_line_for_our_checks_traceback_for_bugs(monkeypatch):
    main = example_recipe()
    with pytest.raises(CliError) as e: main(lr=-1)  # call_parse prints a CliError's message alone and exits with status 1
    assert str(e.value) == '--lr -1: a learning rate is positive, pass one' and isinstance(e.value.__cause__, ValueError)
    with pytest.raises(TypeError, match='a bug'): main(lr=7)  # anything else keeps its traceback
    with pytest.raises(json.JSONDecodeError): main(lr=8)  # a ValueError, but not raised by our checks
    monkeypatch.setenv('RANK', '1')  # a process other than rank 0 of a distributed run: exits 1 quietly, rank 0 says it
    with pytest.raises(SystemExit) as e: main(lr=-1)
    assert e.value.code == 1


class Check(Callback):
    "A ValueError at `event`: a check before the fit starts, or one while batches run"
    def __init__(self, event): self.event = event
    def before_fit(self):
        if self.event == 'before_fit': raise ValueError('bad value at before_fit')
    def before_batch(self):
        if self.event == 'before_batch': raise ValueError('bad value at before_batch')


@pytest.mark.parametrize('event,one_line', [('before_fit', True), ('before_batch', False)])
def test_cli_layer_before_training_only(event, one_line):
    "A callback's check before the fit starts is a user's to fix; a ValueError while batches run is a bug (traceback)"
    @recipe_options()
    def main(**kwargs):
        learn = tiny_learner(small_dls(), cds=Check(event))
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
    with pytest.raises(CliError if one_line else ValueError) as e: main()
    assert str(e.value) == f'bad value at {event}' if one_line else 'when calling event `before_batch`' in str(e.value)


def test_recipe_run_learner_and_no_bar(tmp_path, capsys):
    "`learner` adds the checkpoints (tagged), the speed-ups and, with --no-bar, one plain line per epoch"
    run = RecipeRun('example', checkpoint=str(tmp_path/'ck.pth'), checkpoint_every=1, channels_last=True, bar=False)
    assert capsys.readouterr().out.startswith('1 process on ')  # where it runs: the first line of every run
    learn = run.learner(tiny_learner(small_dls()), tag='teacher')
    names = [type(cb).__name__ for cb in learn.cbs]
    assert 'ProgressCallback' not in names and {'EpochLog', 'CheckpointCallback', 'ChannelsLast'} <= set(names)
    with run.training(learn): learn.fit(1)
    out = capsys.readouterr().out
    assert '\r' not in out and [l.split()[:2] for l in out.splitlines()] == [['epoch', 'train_loss'], ['0', f'{learn.recorder.values[0][0]:.6f}']]
    assert (tmp_path/'ck.teacher.pth').is_file()


def test_recipe_run_export(tmp_path, monkeypatch, capsys):
    "--export: by default `<recipe>.pkl` in the current folder; '' none; a path, there"
    monkeypatch.chdir(tmp_path)
    learn = tiny_learner(small_dls())
    RecipeRun('example').finish(learn)
    RecipeRun('other', export='').finish(learn)
    RecipeRun('third', export=str(tmp_path/'sub'/'m.pkl')).finish(learn, 'student')
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*.pkl')) == ['example.pkl', 'sub/m.pkl']
    assert 'exported the student to' in capsys.readouterr().out


# ---------------------------------------------------------------- the run's identity in its checkpoint
def identity_recipe(made:list|None=None):
    "A recipe with the options that define a run (method, label fraction, epochs) and a tiny fit; `made` lists the data it made"
    @recipe_options()
    def main(
        method:str='cds', # the method
        label_fraction:float=0.1, # labelled fraction
        epochs:int=1, # epochs
        **kwargs):
        "A recipe whose checkpoint must only resume its own run"
        run = RecipeRun('example', **kwargs)
        if made is not None: made.append('data')
        learn = run.learner(tiny_learner(small_dls(n_train=16, n_valid=8)))
        with run.training(learn), learn.no_logging(): learn.fit(epochs)
        return learn
    return main


@pytest.mark.parametrize('changed,said', [
    (dict(method='cds-simclr'), "method: 'cds' in the file, 'cds-simclr' in this run"),
    (dict(method='semi'), "method: 'cds' in the file, 'semi' in this run"),
    (dict(label_fraction=0.2), "label_fraction: 0.1 in the file, 0.2 in this run"),
    (dict(epochs=2, seed=1), "epochs: 1 in the file, 2 in this run; seed: 0 in the file, 1 in this run")])
def test_resume_refuses_another_runs_checkpoint(tmp_path, changed, said, capsys):
    "--resume under another setting: one line naming each differing setting, before anything loads; the file untouched"
    made, ck = [], tmp_path/'ck.pth'
    main = identity_recipe(made)
    main(checkpoint=str(ck), checkpoint_every=1, bar=False)
    saved, made[:] = ck.read_bytes(), []
    assert torch.load(ck, weights_only=False)['run'] == {  # what defines the run: no file, display or speed option
        'recipe': 'example', 'method': 'cds', 'label_fraction': 0.1, 'epochs': 1, 'pretrained': False, 'wd': 1e-2, 'seed': 0,
        'fp16': False, 'sync_bn': False, 'cross_rank': False, 'smoke': False, 'processes': 1}
    with pytest.raises(CliError) as e: main(checkpoint=str(ck), resume=True, **changed)
    msg = str(e.value)
    assert msg.startswith(f'{ck} was saved by another run') and msg.endswith(said) and '\n' not in msg, msg
    assert ck.read_bytes() == saved and made == []  # refused before the recipe made its data


def test_resume_with_the_same_settings(tmp_path):
    "The same run resumes (a display, file or speed option may differ): its epoch is not trained again"
    main, ck = identity_recipe(), tmp_path/'ck.pth'
    first = main(checkpoint=str(ck), checkpoint_every=1)
    w = {k: v.clone() for k, v in first.model.state_dict().items()}
    again = main(checkpoint=str(ck), resume=True, bar=False, workers=0, export='', channels_last=True, finite_check=False)
    assert all(torch.equal(v, w[k]) for k, v in again.model.state_dict().items())  # loaded, the epoch done skipped


# ---------------------------------------------------------------- the finite check, the launch line, CPU threads
def test_recipe_learner_finite_check():
    names = lambda run: [type(cb).__name__ for cb in run.learner(tiny_learner(small_dls())).cbs]
    assert names(RecipeRun('example')).count('FiniteLossCallback') == 1
    assert 'FiniteLossCallback' not in names(RecipeRun('example', finite_check=False))
    main = example_recipe()
    assert inspect.signature(main).parameters['finite_check'].default is True and 'command' not in inspect.signature(main).parameters


def test_launch_line_and_threads(capsys, monkeypatch):
    "Every run says where it runs; --threads sets torch's threads; the wait policy is said as it applies"
    n, where = torch.get_num_threads(), 'cpu: 2 CPU threads (--threads; ' if default_device().type == 'cpu' else ''
    try:
        RecipeRun('example', threads=2)
        assert torch.get_num_threads() == 2
        assert capsys.readouterr().out.splitlines()[0].startswith('1 process on ' + where)
        monkeypatch.setattr(recipe, '_WAIT_POLICY', None)  # torch imported before fastai_cds.recipe, no policy in the environment
        assert 'idle threads spin-wait' in recipe.cpu_threads(2)[1]
        monkeypatch.setattr(recipe, '_WAIT_POLICY', 'PASSIVE')
        assert recipe.cpu_threads(2)[1] == '--threads; idle threads sleep: OMP_WAIT_POLICY=PASSIVE'
        if where: assert recipe.launch_line(1, recipe.cpu_threads(1)) == '1 process on cpu: 1 CPU thread (--threads)'
        with pytest.raises(CliError, match='--threads 0: pass 1 or more'): identity_recipe()(threads=0)
    finally: torch.set_num_threads(n)



def test_missing_extras_one_line(monkeypatch):
    "timm or accelerate missing (their imports blocked): the recipe's CLI layer prints one line naming the extra to install"
    @recipe_options()
    def main(arch:str='senet18', **kwargs):
        RecipeRun('example', **kwargs)
        cifar_model(arch)
    monkeypatch.setitem(sys.modules, 'timm', None)
    with pytest.raises(CliError) as e: main()
    assert str(e.value) == ('This architecture is timm\'s seresnet18, which needs timm: pip install "fastai_cds[timm]" '
                            '(or: pip install timm)')
    monkeypatch.setitem(sys.modules, 'accelerate', None)
    monkeypatch.setenv('WORLD_SIZE', '2'); monkeypatch.setenv('RANK', '0')  # a distributed launch's environment
    with pytest.raises(CliError) as e: main()
    assert "pip install 'fastai_cds[distributed]'" in str(e.value) and '\n' not in str(e.value)


TORCH_IMPORTS = re.compile(r'^(?:from|import) (torch|fastai|fastai_cds)\b(\S*)', re.M)

def test_recipes_import_the_recipe_module_before_torch():
    "Every recipe's first import of torch, fastai or fastai_cds is fastai_cds.recipe: its wait policy applies (see the next test)"
    recipes = sorted((Path(__file__).resolve().parents[1]/'recipes').glob('*.py'))
    assert len(recipes) >= 6
    for r in recipes:
        first = TORCH_IMPORTS.search(r.read_text())
        assert first and first.group(1) + first.group(2) == 'fastai_cds.recipe', f"{r.name}: {first and first.group(0)} first"


CHILD = textwrap.dedent("""
    from fastai_cds.recipe import RecipeRun  # first, as the recipes import it: before torch
    RecipeRun('example')
""")


@pytest.mark.slow  # a fresh process importing fastai (~10 s on a busy 2-core machine)
def test_wait_policy_applies_in_torchs_runtime():
    "fastai_cds.recipe imported first: torch's OpenMP runtime takes OMP_WAIT_POLICY=PASSIVE (it spins 0 times), and the run says so"
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_WAIT_POLICY', 'OMP_NUM_THREADS')}
    r = subprocess.run([sys.executable, '-c', CHILD], capture_output=True, text=True, timeout=300,
                       env={**env, 'OMP_DISPLAY_ENV': 'VERBOSE', 'PYTHONWARNINGS': 'ignore'})  # the runtime prints its settings
    assert r.returncode == 0, r.stderr[-3000:]
    spin = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", r.stderr)
    assert spin and set(spin) == {'0'}, r.stderr[-2000:]  # libgomp: PASSIVE spins 0 times (no policy: 300000)
    line = r.stdout.splitlines()[0]
    assert line.startswith('1 process on ') and ('OMP_WAIT_POLICY=PASSIVE' in line or ' 1 CPU thread ' in line or 'cpu' not in line)



@pytest.mark.slow  # two runs of a recipe in fresh processes; the in-process `identity_recipe` above is CI's check of the same path
def test_a_recipe_refuses_to_resume_another_run(tmp_path):
    "semisup.py --smoke saved, then resumed with another --method and --label-fraction: one line naming both, the file untouched"
    recipe, ck = Path(__file__).resolve().parents[1]/'recipes'/'semisup.py', tmp_path/'ck.pth'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'TMPDIR': str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, str(recipe), '--smoke', '--checkpoint', str(ck), *a], capture_output=True, text=True,
                                    timeout=600, env=env)
    r = run('--checkpoint-every', '1', '--method', 'cds')
    assert r.returncode == 0 and ck.is_file(), r.stderr[-3000:]
    saved = ck.read_bytes()
    r = run('--resume', '--method', 'semi', '--label-fraction', '0.2')
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().endswith("label_fraction: 0.1 in the file, 0.2 in this run; method: 'cds' in the file, 'semi' in this run")
    assert ck.read_bytes() == saved
