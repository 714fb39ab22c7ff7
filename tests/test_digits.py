"Tests of `fastai_cds.digits`: scikit-learn's digits as DataLoaders, with stratified label fractions."
import numpy as np
import pytest

from fastai_cds.digits import digits_dls, digits_items, digits_splits, stratified_fraction

N_DIGITS = 1797  # scikit-learn's digits


@pytest.fixture(scope="module")
def labels():
    return digits_items()[1]


def item_key(it):
    "An item (uint8 image, label) as something hashable"
    im, y = it
    return (im.tobytes(), int(y))


def item_labels(ds):
    return np.array([int(y) for _, y in ds.items])


# ---------------------------------------------------------------- items
def test_digits_items(labels):
    items, lab = digits_items()
    assert len(items) == len(lab) == N_DIGITS
    im, y = items[0]
    assert im.dtype == np.uint8 and im.shape == (8, 8) and im.max() > 100  # 0..16 scaled to 0..255
    assert y == lab[0]
    im3 = digits_items(3)[0][0][0]
    assert im3.shape == (8, 8, 3) and (im3 == im[..., None]).all()
    with pytest.raises(ValueError):
        digits_items(2)


# ---------------------------------------------------------------- splits
def test_splits_disjoint_and_cover(labels):
    lab, unlab, valid = digits_splits(labels, valid_pct=0.2, label_fraction=0.3, seed=0)
    sets = [set(lab.tolist()), set(unlab.tolist()), set(valid.tolist())]
    assert sum(map(len, sets)) == N_DIGITS
    assert set.union(*sets) == set(range(N_DIGITS))
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # valid split is stratified too: ~20% of every class
    for c in range(10):
        n_c = (labels == c).sum()
        assert abs((labels[valid] == c).sum() - round(0.2 * n_c)) <= 1


def test_splits_deterministic_per_seed(labels):
    a = digits_splits(labels, 0.2, 0.3, seed=0)
    b = digits_splits(labels, 0.2, 0.3, seed=0)
    c = digits_splits(labels, 0.2, 0.3, seed=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[2], c[2])


def test_valid_set_independent_of_label_fraction(labels):
    vs = [digits_splits(labels, 0.2, f, seed=3)[2] for f in (0.05, 0.1, 0.5, 1.0)]
    for v in vs[1:]:
        np.testing.assert_array_equal(vs[0], v)
    # and the labelled sets grow with the fraction, inside the same training pool
    labs = [set(digits_splits(labels, 0.2, f, seed=3)[0].tolist()) for f in (0.1, 1.0)]
    assert labs[0] < labs[1]
    assert labs[1] == set(range(N_DIGITS)) - set(vs[0].tolist())


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_label_fraction_stratified(labels, fraction):
    lab, unlab, valid = digits_splits(labels, 0.2, fraction, seed=0)
    pool = np.concatenate([lab, unlab])
    for c in range(10):
        n_pool = (labels[pool] == c).sum()
        n_lab = (labels[lab] == c).sum()
        assert n_lab >= 1, f"class {c} lost"
        assert abs(n_lab - round(fraction * n_pool)) <= 1, (c, n_lab, n_pool)


def test_stratified_fraction_keeps_one_per_class():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 1)
    keep, rest = stratified_fraction(labels, 0.05, seed=0)
    assert sorted(set(labels[keep].tolist())) == [0, 1, 2]
    assert (labels[keep] == 0).sum() == round(0.05 * 50)
    assert len(keep) + len(rest) == len(labels) and not set(keep.tolist()) & set(rest.tolist())
    keep, rest = stratified_fraction(labels, 1.0)
    assert len(keep) == len(labels) and len(rest) == 0


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, float("nan")])
def test_invalid_fraction_raises(labels, fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_fraction(labels, fraction)
    if fraction in (0, 1.5):  # each call builds the DataLoaders first: two are enough
        with pytest.raises(ValueError, match="fraction"):
            digits_dls(device="cpu", size=8, label_fraction=fraction)


# ---------------------------------------------------------------- DataLoaders
@pytest.fixture(scope="module")
def dls_10pct():
    return digits_dls(device="cpu", size=16, label_fraction=0.1, bs=16, seed=0)


def test_dls_label_fraction(labels, dls_10pct):
    dls = dls_10pct
    y_train = item_labels(dls.train_ds)
    y_valid = item_labels(dls.valid_ds)
    assert abs(len(y_valid) - 0.2 * N_DIGITS) <= 10
    n_pool = N_DIGITS - len(y_valid)
    assert abs(len(y_train) - 0.1 * n_pool) <= 10
    lab, unlab, valid = digits_splits(labels, 0.2, 0.1, seed=0)
    pool = np.concatenate([lab, unlab])
    for c in range(10):
        n_c = (labels[pool] == c).sum()
        assert (y_train == c).sum() >= 1
        assert abs((y_train == c).sum() - round(0.1 * n_c)) <= 1
    # exactly the items of the split, train and valid
    items = digits_items()[0]
    assert sorted(map(item_key, dls.train_ds.items)) == sorted(item_key(items[i]) for i in lab)
    assert sorted(map(item_key, dls.valid_ds.items)) == sorted(item_key(items[i]) for i in valid)


def test_dls_valid_same_for_other_label_fraction(dls_10pct):
    other = digits_dls(device="cpu", size=16, label_fraction=0.5, bs=16, seed=0)
    assert [item_key(it) for it in other.valid_ds.items] == [item_key(it) for it in dls_10pct.valid_ds.items]
    assert len(other.train_ds) > 4 * len(dls_10pct.train_ds)
    # no valid item among the training items
    valid = set(map(item_key, other.valid_ds.items))
    assert not valid & set(map(item_key, other.train_ds.items))


def test_dls_other_seed_other_split(dls_10pct):
    other = digits_dls(device="cpu", size=16, label_fraction=0.1, bs=16, seed=1)
    assert [item_key(it) for it in other.valid_ds.items] != [item_key(it) for it in dls_10pct.valid_ds.items]
    same = digits_dls(device="cpu", size=16, label_fraction=0.1, bs=16, seed=0)
    assert [item_key(it) for it in same.train_ds.items] == [item_key(it) for it in dls_10pct.train_ds.items]


def test_dls_batch_shapes(dls_10pct):
    x, y = dls_10pct.one_batch()
    assert x.shape == (16, 1, 16, 16) and y.shape == (16,)
    assert dls_10pct.c == 10 and list(dls_10pct.vocab) == list(range(10))
    # normalised with the dataset's statistics: roughly zero-mean, unit-std
    xv, _ = dls_10pct.valid.one_batch()
    assert abs(float(xv.mean())) < 0.5 and 0.5 < float(xv.std()) < 1.5


@pytest.mark.parametrize("size,n_channels", [(24, 3), (8, 1)])
def test_dls_size_and_channels(size, n_channels):
    dls = digits_dls(device="cpu", size=size, n_channels=n_channels, label_fraction=0.1, bs=8)
    for dl in (dls.train, dls.valid):
        x, y = dl.one_batch()
        assert x.shape == (8, n_channels, size, size)
    if n_channels == 3:  # the gray image repeated
        x, _ = dls.valid.one_batch()
        assert x.float().std(1).max() < 1e-5


def test_dls_bad_channels():
    with pytest.raises(ValueError, match="n_channels"):
        digits_dls(device="cpu", size=8, n_channels=2)


def test_dls_unlabelled_rest(labels):
    dls, udl = digits_dls(device="cpu", size=8, label_fraction=0.2, bs=8, seed=0, unlabelled=True)
    lab, unlab, valid = digits_splits(labels, 0.2, 0.2, seed=0)
    items = digits_items()[0]
    train = sorted(map(item_key, dls.train_ds.items))
    rest = sorted(map(item_key, udl.dataset.items))
    assert train == sorted(item_key(items[i]) for i in lab)
    assert rest == sorted(item_key(items[i]) for i in unlab)
    assert sorted(map(item_key, dls.valid_ds.items)) == sorted(item_key(items[i]) for i in valid)
    x, _ = udl.one_batch()
    assert x.shape == (8, 1, 8, 8)
    with pytest.raises(ValueError, match="label_fraction"):
        digits_dls(device="cpu", size=8, label_fraction=1., unlabelled=True)


# ---------------------------------------------------------------- images in memory
def test_in_memory_loader_gives_fastai_batches_and_exports_a_file_loader(tmp_path):
    "folder_tensor_dls vs fastai's ImageDataLoaders.from_folder on the same folder: same vocab, same validation batches; the export loads files"
    import torch
    from fastai.vision.all import ImageDataLoaders, Learner, CrossEntropyLossFlat, Normalize, get_image_files, load_learner, imagenet_stats, nn
    from fastai_cds.tensor_data import TensorImageDL, folder_tensor_dls
    from fastai_cds.recipe import smoke_folder
    from fastai_cds.views import reference_views
    path = smoke_folder(16, 'test', n_train=4, n_valid=3)
    norm = [Normalize.from_stats(*imagenet_stats)]
    ours = folder_tensor_dls(path, 'test', bs=8, batch_tfms=norm, num_workers=0)
    ref = ImageDataLoaders.from_folder(path, valid='test', bs=8, num_workers=0, batch_tfms=norm)
    assert list(ours.vocab) == list(ref.vocab) and len(ours.train_ds) == len(ref.train_ds) == 40 and len(ours.valid_ds) == 30
    assert type(ours.train) is TensorImageDL and ours.train.drop_last and ours.train.shuffle
    for (x, y), (xr, yr) in zip(ours.valid, ref.valid):
        torch.testing.assert_close(x.as_subclass(torch.Tensor), xr.as_subclass(torch.Tensor)); assert (y == yr).all()
    # the reference's CIFAR views run on the training batches only (split_idx 0)
    views = reference_views('cifar', 16)
    dls = folder_tensor_dls(path, 'test', bs=8, batch_tfms=views.batch_tfms, num_workers=0)
    xs = [dls.train.one_batch()[0] for _ in range(2)]
    assert not torch.equal(xs[0], xs[1])  # shuffled, cropped, cut out: per batch
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(3*16*16, 10)), loss_func=CrossEntropyLossFlat())
    learn.export(tmp_path/'m.pkl')
    plain = load_learner(tmp_path/'m.pkl')
    files = get_image_files(path/'test')[:4]  # the in-memory validation set's order
    x_files = plain.dls.test_dl(files).one_batch()[0]
    x_mem = next(iter(dls.valid))[0][:4]
    torch.testing.assert_close(x_files.as_subclass(torch.Tensor), x_mem.as_subclass(torch.Tensor))
    assert plain.predict(files[0])[0] in dls.vocab


def test_tensor_images_bad_input():
    import torch
    from fastai_cds.tensor_data import TensorImages
    with pytest.raises(ValueError, match=r"images must be one uint8 tensor \(n, c, h, w\), got torch.float32 \(4, 3, 8, 8\)"):
        TensorImages(torch.rand(4, 3, 8, 8), torch.zeros(4), vocab=['a'])
    with pytest.raises(ValueError, match="4 images but 3 labels: give one label id per image"):
        TensorImages(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(3), vocab=['a'])
