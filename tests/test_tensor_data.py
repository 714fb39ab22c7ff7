"""Tests of `fastai_cds.tensor_data`'s checks: bad images, labels and folders are refused when the DataLoaders are made,
with the fix in the message (the in-memory loader's batches and export: tests/test_digits.py)."""
import pytest
import torch
from PIL import Image

from fastai_cds.tensor_data import folder_tensor_dls, tensor_dls

IMS, YS = torch.randint(0, 255, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 3
VOCAB = ['a', 'b', 'c']


def dls(train_ims=IMS[:32], train_ys=YS[:32], bs=8):
    return tensor_dls((train_ims, train_ys), (IMS[32:], YS[32:]), VOCAB, bs=bs)


@pytest.mark.parametrize('case,kwargs,match', [
    ('HWC images', dict(train_ims=IMS[:32].permute(0, 2, 3, 1)), r"images are \(n, h, w, c\) \(32, 8, 8, 3\); pass them as \(n, c, h, w\)"),
    ('a label outside the vocab', dict(train_ys=YS[:32] + 10), "label id 10 is outside the vocab of 3 classes"),
    ('float labels', dict(train_ys=YS[:32].float() + 0.5), "labels must be integer class ids"),
    ('fewer images than a batch', dict(train_ims=IMS[:6], train_ys=YS[:6]), "6 training images make no batch of bs=8"),
])
def test_bad_input_is_refused_when_made(case, kwargs, match):
    with pytest.raises(ValueError, match=match): dls(**kwargs)


def test_good_input_gives_batches():
    x, y = dls().one_batch()
    assert x.shape == (8, 3, 8, 8) and y.dtype == torch.long


def _folder(root, classes):
    for split, names in classes.items():
        for c in names:
            (root / split / c).mkdir(parents=True)
            Image.new('RGB', (8, 8)).save(root / split / c / '0.png')
    return root


def test_folder_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*nope"): folder_tensor_dls(tmp_path / 'nope')
    root = _folder(tmp_path / 'a', {'train': ['x', 'y']})
    with pytest.raises(FileNotFoundError, match=r"has no valid/ folder \(it has: train\)"): folder_tensor_dls(root, num_workers=0)
    (root / 'valid').mkdir()
    with pytest.raises(FileNotFoundError, match="no image in .*valid"): folder_tensor_dls(root, num_workers=0)
    root = _folder(tmp_path / 'b', {'train': ['x', 'y'], 'valid': ['x', 'zz']})
    with pytest.raises(ValueError, match=r"valid has classes with no training images in .*train: zz"): folder_tensor_dls(root, num_workers=0)
