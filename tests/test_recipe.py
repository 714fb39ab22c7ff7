"""Tests of `fastai_cds.recipe`, what the recipes share:
datasets from a local folder or a download (and the messages when neither works), labelled fractions, learners by
architecture name, the fine-grained layouts, the smoke folder, result tables and the export check."""
import re
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
from fastai.data.external import URLs
from fastcore.script import CliError
from PIL import Image

import fastai_cds.recipe as recipe
from fastai_cds.recipe import (arch_learner, dataset_path, export_and_check, folder_dls, labelled_data, print_table, report, smoke_folder,
                               split_table, url_of)

from helpers import manual_valid, small_dls, tiny_cnn, tiny_learner

pytestmark = pytest.mark.usefixtures('seeded')  # set_seed(0) before every test (conftest.py)


# ---------------------------------------------------------------- dataset_path, url_of
def test_dataset_path_local_folder_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, 'untar_data', lambda *a, **k: pytest.fail('downloaded although a folder was given'))
    assert dataset_path('CIFAR', URLs.CIFAR, tmp_path) == tmp_path
    assert dataset_path('CIFAR', URLs.CIFAR, str(tmp_path)) == tmp_path


def test_dataset_path_messages(tmp_path, monkeypatch):
    with pytest.raises(CliError, match=r"CUB is not among fastai's datasets: download it yourself and pass its folder with --path"):
        dataset_path('CUB', None)
    with pytest.raises(CliError, match=re.escape(f"--path {tmp_path / 'nope'}: no such folder")):
        dataset_path('CIFAR', URLs.CIFAR, tmp_path / 'nope')
    def offline(url, *a, **k): raise URLError('no network')
    monkeypatch.setattr(recipe, 'untar_data', offline)
    with pytest.raises(CliError, match=r"Could not download CIFAR from .*URLError.*no network.*pass the folder with --path") as e:
        dataset_path('CIFAR', URLs.CIFAR)
    assert URLs.CIFAR in str(e.value)
    with pytest.raises(CliError, match=r"pass the folder with --dataset \(a layout\)"):
        dataset_path('CIFAR', URLs.CIFAR, layout='a layout', option='--dataset')


def test_dataset_path_downloads_with_fastai(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, 'untar_data', lambda url: calls.append(url) or tmp_path)
    assert dataset_path('CIFAR', URLs.CIFAR) == tmp_path and calls == [URLs.CIFAR]


def test_url_of():
    assert url_of('CIFAR') == URLs.CIFAR and url_of('IMAGENETTE_160') == URLs.IMAGENETTE_160
    assert url_of('NOT_A_DATASET') is None and url_of('path') is None  # `URLs.path` is a method, not a URL


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
    with pytest.raises(CliError, match='no train/ and valid/, val/ or test/ folders'): folder_dls(tmp_path, 8, 2)


# ---------------------------------------------------------------- tables, report, export check
def test_print_table(capsys):
    print_table({'method': 'cds', 'top-1 (%)': '81.20', 'x': 3})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ['| method | top-1 (%) | x |', '| ------ | --------- | - |', '| cds    | 81.20     | 3 |']


def test_report_numbers_are_the_learners(capsys):
    learn = tiny_learner(small_dls())
    logits, ys = manual_valid(learn)
    report(learn, {'method': 'cds'}, paper=80.84, secs=3.)
    header, _, values = [[c.strip() for c in l.strip('|').split('|')] for l in capsys.readouterr().out.splitlines()]
    row = dict(zip(header, values))
    assert row['method'] == 'cds' and row['paper top-1 (%)'] == '80.84' and row['train time'] == '3.0 s'
    assert float(row['top-1 (%)']) == pytest.approx((logits.argmax(1) == ys).float().mean().item() * 100, abs=0.006)
    assert float(row['valid loss']) == pytest.approx(F.cross_entropy(logits, ys).item(), abs=6e-5)
    assert 0 <= float(row['ECE (%)']) <= 100


def test_export_and_check(tmp_path, capsys):
    learn = tiny_learner(small_dls())
    export_and_check(learn, tmp_path / 'm.pkl', what='student')
    out = capsys.readouterr().out
    n = sum(p.numel() for p in tiny_cnn().parameters())
    assert f"exported the student to {tmp_path / 'm.pkl'}: a plain Sequential, {n:,} parameters" in out
    assert Path(tmp_path / 'm.pkl').exists()


# ---------------------------------------------------------------- data of the semi-supervised and distillation recipes
def test_labelled_data_digits_fraction_and_rest():
    dls, udl = labelled_data('digits', 16, 16, label_fraction=0.1, seed=0, unlabelled_bs=8)
    assert udl.bs == 8 and len(dls.train_ds) + len(udl.dataset) == 1438  # the training part of digits_splits
    assert labelled_data('digits', 16, 16)[1] is None  # every label kept: no unlabelled loader


def test_labelled_data_unknown_dataset():
    "--dataset neither digits, a folder nor a fastai URLs name: one message, no download tried"
    with pytest.raises(CliError, match='--dataset CIFAR10: not digits, a folder or a fastai URLs name'): labelled_data('CIFAR10', 16, 16)


def test_arch_learner_small_cnn_and_torchvision():
    dls = labelled_data('digits', 16, 16)[0]
    learn = arch_learner('cnn:8', dls)
    assert [m.out_channels for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d)][:3] == [8, 8, 16]
    learn = arch_learner('resnet18', dls)
    assert learn.model[0][0].in_channels == 1 and learn.model[-1][-1].out_features == 10  # the digits' 1 channel, 10 classes
    with pytest.raises(CliError, match='--arch resnet19: .*did you mean resnet18'): arch_learner('resnet19', dls)


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
    with pytest.raises(CliError, match='ImageNet-style'): split_table(tmp_path)


# ---------------------------------------------------------------- the paper's numbers and the best epoch
def test_paper_tables_match_the_paper():
    "Tables 1-2 (CIFAR, ImageNet) and 5-6 (fine-grained, ResNet50, from scratch / fine-tuned), typed in from ../shared/cds-method.md"
    from fastai_cds.recipe import PAPER_TOP1, paper_top1
    m = ('base', 'dsn', 'dks', 'dhm', 'cds')
    tables = {
        ('cifar100', 'resnet18'): (77.45, 78.30, 78.96, 78.82, 80.84), ('cifar100', 'resnet50'): (77.81, 78.96, 80.95, 81.12, 81.31),
        ('cifar10', 'resnet18'): (94.96, 95.31, 95.72, 95.61, 96.49),
        ('imagenet', 'resnet18'): (69.21, 69.54, 71.32, 71.29, 72.85), ('imagenet', 'resnet50'): (75.30, 75.37, 76.47, 76.57, 78.25),
        ('cub', 'resnet50', 'scratch'): (60.65, 62.37, 63.59, 64.01, 64.65), ('cub', 'resnet50', 'pretrained'): (78.50, 80.14, 81.34, 81.27, 82.10),
        ('cars', 'resnet50', 'scratch'): (79.86, 81.04, 81.52, 81.49, 82.07), ('cars', 'resnet50', 'pretrained'): (90.25, 91.32, 92.54, 92.31, 92.90),
        ('flowers', 'resnet50', 'scratch'): (87.52, 88.54, 88.94, 89.03, 89.26), ('flowers', 'resnet50', 'pretrained'): (97.68, 98.64, 99.01, 98.84, 99.39),
        ('dogs', 'resnet50', 'scratch'): (64.00, 66.32, 68.31, 68.38, 69.02), ('dogs', 'resnet50', 'pretrained'): (76.47, 77.21, 78.32, 78.20, 80.99),
        ('aircraft', 'resnet50', 'scratch'): (74.07, 74.49, 75.07, 75.00, 75.43), ('aircraft', 'resnet50', 'pretrained'): (87.43, 89.31, 89.20, 89.57, 90.52),
    }
    assert set(PAPER_TOP1) == set(tables)
    for setting, numbers in tables.items():
        assert [paper_top1(*setting, method=k) for k in m] == list(numbers), setting
    assert paper_top1('cub', 'resnet50', method='cds') is None  # the fine-grained tables need the setting
