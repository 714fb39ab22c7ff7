"""Tests of `fastai_cds.export`: `learn.export()` of a CDS learner gives a plain fastai Learner that loads and predicts
the same in a process where fastai_cds cannot be imported; the in-memory learner keeps training with its heads;
`plain_learner` and `_is_ours`."""
import json
import zipfile
import textwrap
import warnings
from functools import partial

import pytest
import torch
import torch.nn as nn
import fastai.callback.fp16  # noqa: F401  (patches Learner.to_fp16)
from fastai.callback.mixup import MixUp
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.learner import create_vision_model, vision_learner
from torchvision.models import resnet18

from fastai_cds.cds import CDSCallback
from fastai_cds.core import LossTerms
from fastai_cds.digits import digits_dls, digits_items, digits_splits
from fastai_cds.export import _is_ours, plain_learner
from fastai_cds.backbone import backbone_state, export_backbone
from fastai_cds.checkpoints import load_checkpoint
from fastai_cds.metrics import ExpectedCalibrationError
from fastai_cds.model import DeepSupervisionModel, split_with_heads

from helpers import BLOCKED, Spy, hooked_modules, no_bar, ours, run_children, small_dls, snapshot, stop, tiny_cnn, tiny_learner

KINDS = ["cnn", "resnet18", "fp16", "mixup"]


def fresh_model(kind):
    "The plain model of `kind`, rebuilt identically (`tiny_cnn`: plain fastai/torch layers, picklable by reference)"
    if kind == "resnet18":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return create_vision_model(resnet18, 10, pretrained=False, n_in=3)
    return tiny_cnn()


def cds():
    return CDSCallback(verbose=False)


def fit(learn, epochs=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU: autocast('cuda') / GradScaler disabled with a warning
        with learn.no_bar():
            learn.fit(epochs, 1e-3)


CHILD = BLOCKED + textwrap.dedent("""
    inputs = torch.load(f'{d}/inputs.pt', weights_only=False)
    res = {'blocked': blocked}
    out = {}
    for kind in sys.argv[2:]:
        learn = load_learner(f'{d}/{kind}.pkl')
        m = learn.model.eval()
        with torch.no_grad():
            pred = m(inputs[kind]['x'])
        dl = learn.dls.test_dl(inputs[kind]['items'])
        preds, _ = learn.get_preds(dl=dl)
        hooks = [n for n, mod in m.named_modules()
                 if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks]
        out[kind] = {'pred': pred, 'preds': preds}
        res[kind] = {
            'sd': [[k, list(v.shape)] for k, v in m.state_dict().items()],
            'hooks': hooks,
            'model_type': type(m).__module__ + '.' + type(m).__qualname__,
            'modules': sorted({type(mod).__module__ for mod in m.modules()}),
            'cbs': [type(cb).__module__ + '.' + type(cb).__qualname__ for cb in learn.cbs],
            'attrs': sorted(k for k, v in vars(learn).items() if type(v).__module__.startswith('fastai_cds')),
            'splitter': getattr(learn.splitter, '__module__', None) or type(learn.splitter).__module__,
            'loss': type(learn.loss_func).__module__,
        }
    res['loaded_cds_modules'] = [k for k, v in sys.modules.items() if k.startswith('fastai_cds') and v is not None]
    torch.save(out, f'{d}/out.pt')
    json.dump(res, open(f'{d}/res.json', 'w'))
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Train four CDS learners one epoch on a few digits, export them, load them in a fresh process without fastai_cds.

    Returns the in-memory learners (and what they predicted right after training), the export files and what the
    fresh process found."""
    d = tmp_path_factory.mktemp("export") / "fastai_cds"  # the learners' path, pickled into the exports: a clone's folder name
    d.mkdir()
    dls1 = digits_dls(device="cpu", size=16, label_fraction=0.1, valid_pct=0.05, bs=16)
    dls3 = digits_dls(device="cpu", size=32, n_channels=3, label_fraction=0.05, valid_pct=0.05, bs=16)
    learners = {}
    set_seed(0)
    learners["cnn"] = Learner(dls1, tiny_cnn(), cbs=cds(), path=d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learners["resnet18"] = vision_learner(dls3, resnet18, pretrained=False, cbs=cds(), path=d)
    learners["fp16"] = Learner(dls1, tiny_cnn(), cbs=cds(), path=d).to_fp16()
    learners["mixup"] = Learner(dls1, tiny_cnn(), cbs=[cds(), MixUp()], path=d)

    items = {1: digits_items(1)[0], 3: digits_items(3)[0]}
    valid = digits_splits(digits_items()[1], 0.05, 1., 0)[2][:10]
    inputs, expected, before = {}, {}, {}
    for kind, learn in learners.items():
        fit(learn)
        dls = learn.dls
        nc = 3 if kind == "resnet18" else 1
        x = dls.valid.one_batch()[0][:8].as_subclass(torch.Tensor).clone()
        its = [items[nc][i] for i in valid]
        plain = learn.model.model
        plain.eval()
        with torch.no_grad():
            pred = plain(x)
        with learn.no_bar(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="fastai.callback.fp16")  # fp16 on a CPU: disabled, with a warning
            preds = learn.get_preds(dl=dls.test_dl(its))[0]
        inputs[kind] = {"x": x, "items": its}
        expected[kind] = {"pred": pred, "preds": preds}
        before[kind] = dict(opt=learn.opt, model=learn.model, plain=learn.model.model, heads=learn.model.heads,
                            cbs=list(learn.cbs))
        learn.export(d / f"{kind}.pkl")
    torch.save(inputs, d / "inputs.pt")
    run_children((CHILD, d, *KINDS))
    res = json.load(open(d / "res.json"))
    out = torch.load(d / "out.pt", weights_only=False)
    return dict(dir=d, learners=learners, before=before, expected=expected, res=res, out=out)


def test_child_process_has_no_fastai_cds(exported):
    assert exported["res"]["blocked"], "`import fastai_cds` should fail in the loading process"
    assert exported["res"]["loaded_cds_modules"] == []


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_predictions_match(exported, kind):
    exp, got = exported["expected"][kind], exported["out"][kind]
    assert got["pred"].shape == exp["pred"].shape == (8, 10)
    torch.testing.assert_close(got["pred"], exp["pred"], atol=1e-5, rtol=0)
    assert got["preds"].shape == exp["preds"].shape == (10, 10)
    torch.testing.assert_close(got["preds"], exp["preds"], atol=1e-5, rtol=0)
    # a meaningful comparison: the predictions differ from one input to the next
    assert exp["pred"].std(0).sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_exported_learner_is_plain(exported, kind):
    res = exported["res"][kind]
    fresh = fresh_model(kind)
    assert res["sd"] == [[k, list(v.shape)] for k, v in fresh.state_dict().items()]
    assert res["model_type"] == "torch.nn.modules.container.Sequential"
    assert not any(m.startswith("fastai_cds") for m in res["modules"])
    assert res["hooks"] == []
    assert not any(cb.startswith("fastai_cds") for cb in res["cbs"]), res["cbs"]
    assert res["attrs"] == []
    assert not res["splitter"].startswith("fastai_cds")
    if kind == "mixup":
        assert "fastai.callback.mixup.MixUp" in res["cbs"]
    assert ours(exported["dir"] / f"{kind}.pkl") == []
    with zipfile.ZipFile(exported["dir"] / f"{kind}.pkl") as z:  # the learner's path, a folder named fastai_cds, is in it: not an import
        assert any(b"fastai_cds" in z.read(n) for n in z.namelist())


@pytest.mark.parametrize("kind", KINDS)
def test_in_memory_learner_intact_after_export(exported, kind):
    learn, before = exported["learners"][kind], exported["before"][kind]
    assert isinstance(learn.model, DeepSupervisionModel)
    assert learn.model is before["model"] and learn.model.model is before["plain"] and learn.model.heads is before["heads"]
    assert learn.opt is before["opt"]
    assert set(map(id, learn.cbs)) == set(map(id, before["cbs"]))
    assert isinstance(learn.cds, CDSCallback) and learn.cds.ds is learn.model
    assert any(isinstance(cb, CDSCallback) for cb in learn.cbs)
    assert any(isinstance(cb, LossTerms) for cb in learn.cbs)
    assert isinstance(learn.splitter, partial) and learn.splitter.func is split_with_heads
    assert hooked_modules(learn.model) == [] and learn.model.armed is False
    opt_ids = {id(p) for pg in learn.opt.param_groups for p in pg["params"]}
    head_params = list(learn.model.heads.parameters())
    assert head_params and all(id(p) in opt_ids for p in head_params)
    # the optimizer (and its state) is the one from before the export
    assert any(learn.opt.state[p] for p in head_params), "Adam state of the heads kept"


def test_in_memory_learner_keeps_training(exported):
    learn = exported["learners"]["cnn"]
    heads0 = {k: v.clone() for k, v in learn.model.heads.state_dict().items()}
    body0 = {k: v.clone() for k, v in learn.model.model.state_dict().items()}
    n_hist = len(learn.loss_terms.history["contra_0"])
    fit(learn)
    assert isinstance(learn.model, DeepSupervisionModel)
    changed = [k for k, v in learn.model.heads.state_dict().items() if not torch.equal(v, heads0[k])]
    assert any(k.endswith("weight") for k in changed), "the heads did not train after the export"
    assert any(not torch.equal(v, body0[k]) for k, v in learn.model.model.state_dict().items())
    assert len(learn.loss_terms.history["contra_0"]) > n_hist, "contrastive terms still computed"
    # and it exports again, as plainly
    f = exported["dir"] / "again.pkl"
    learn.export(f)
    assert ours(f) == []
    assert isinstance(learn.model, DeepSupervisionModel)


def test_export_before_training(tmp_path):
    "Right after Learner creation (heads attached, no optimizer yet) the export is plain too"
    learn = no_bar(Learner(digits_dls(device="cpu", size=16, label_fraction=0.05, valid_pct=0.05, bs=16), tiny_cnn(), cbs=cds()))
    assert isinstance(learn.model, DeepSupervisionModel)
    learn.export(tmp_path / "e.pkl")
    assert ours(tmp_path / "e.pkl") == []
    assert isinstance(learn.model, DeepSupervisionModel) and learn.opt is None
    loaded = torch.load(tmp_path / "e.pkl", weights_only=False)
    assert type(loaded.model) is nn.Sequential
    assert [k for k in loaded.model.state_dict()] == [k for k in tiny_cnn().state_dict()]


@pytest.mark.slow  # CI's time: a fresh process importing fastai (~10 s)
def test_export_drops_fastai_cds_metrics(tmp_path):
    "A fastai_cds metric in metrics= stays on the learner but is not written into the export"
    from fastai.vision.all import Learner, ConvLayer, CrossEntropyLossFlat, accuracy
    from fastai_cds.all import CDSCallback, ExpectedCalibrationError, digits_dls
    dls = digits_dls(size=16, label_fraction=0.3, bs=16, device='cpu')
    cnn = nn.Sequential(ConvLayer(1, 8), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    ece = ExpectedCalibrationError()
    learn = Learner(dls, cnn, loss_func=CrossEntropyLossFlat(), metrics=[accuracy, ece], cbs=CDSCallback(verbose=False))
    fname = tmp_path/'m.pkl'
    learn.export(fname)
    assert ece in learn.metrics
    assert ours(fname) == []
    out = run_children((BLOCKED + "print(len(load_learner(f'{d}/m.pkl').metrics))", tmp_path))[0]
    assert out.strip().endswith('1')


# ---------------------------------------------------------------- plain_learner, _is_ours
def test_is_ours():
    assert _is_ours(cds()) and _is_ours(ExpectedCalibrationError()) and _is_ours(CDSCallback)
    assert _is_ours(partial(split_with_heads, None)) and _is_ours(split_with_heads)
    assert not any(_is_ours(o) for o in (accuracy, MixUp(), partial(accuracy), Learner, tiny_cnn(), None, 3))


def test_plain_learner_shows_the_plain_learner_for_the_block(tmp_path):
    learn = no_bar(Learner(digits_dls(device="cpu", size=16, label_fraction=0.05, valid_pct=0.05, bs=16), tiny_cnn(),
                           cbs=[cds(), MixUp()], metrics=[accuracy, ExpectedCalibrationError()]))
    fit(learn)
    model, splitter, opt, cbs, metrics = learn.model, learn.splitter, learn.opt, list(learn.cbs), list(learn.metrics)
    with plain_learner(learn) as plain:
        assert plain is learn
        assert learn.model is model.model and type(learn.model) is nn.Sequential
        assert learn.splitter is splitter.args[0] and not _is_ours(learn.splitter)
        assert learn.opt is None
        assert not any(_is_ours(cb) for cb in learn.cbs) and any(isinstance(cb, MixUp) for cb in learn.cbs)
        assert not hasattr(learn, 'cds') and not hasattr(learn, 'loss_terms')
        assert [m.name for m in learn.metrics] == ['accuracy']
    # everything back
    assert learn.model is model and learn.splitter is splitter and learn.opt is opt
    assert set(map(id, learn.cbs)) == set(map(id, cbs)) and list(learn.metrics) == metrics and learn.cds.ds is model


CHILD_IMPORT = textwrap.dedent("""
    import sys, warnings
    warnings.filterwarnings('ignore')
    import torch, torch.nn as nn
    torch.set_num_threads(1)
    from fastai.layers import ConvLayer, Flatten
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai_cds.cds import CDSCallback  # what a user of CDSCallback imports, and nothing else of fastai_cds
    from fastai_cds.digits import digits_dls
    dls = digits_dls(size=16, label_fraction=0.05, valid_pct=0.05, bs=16, device='cpu')
    m = nn.Sequential(ConvLayer(1, 8, stride=2), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(16, 10))
    Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)).export(sys.argv[1] + '/e.pkl')
""")


@pytest.mark.slow  # CI's time: a fresh process importing fastai (~12 s); test_child_process_has_no_fastai_cds loads every kind in CI
def test_export_is_plain_whatever_fastai_cds_module_was_imported(tmp_path):
    run_children((CHILD_IMPORT, tmp_path))
    assert ours(tmp_path / "e.pkl") == []


def test_the_pickle_check_sees_references_and_ignores_paths(tmp_path):
    """`ours` reads the imports a pickle needs, not its bytes: fastai's own export of a CDS learner needs fastai_cds;
    ours, from a learner whose path is a folder named fastai_cds (as a clone of this repository is), does not."""
    root = tmp_path / 'fastai_cds'
    root.mkdir()
    learn = no_bar(Learner(digits_dls(device="cpu", size=16, label_fraction=0.05, valid_pct=0.05, bs=16), tiny_cnn(), cbs=cds(), path=root))
    Learner.export(learn, root / 'raw.pkl')  # fastai's export: the wrapper, heads and callbacks inside
    assert 'fastai_cds.model.DeepSupervisionModel' in ours(root / 'raw.pkl')
    learn.export(root / 'e.pkl')
    with zipfile.ZipFile(root / 'e.pkl') as z: assert any(b'fastai_cds' in z.read(n) for n in z.namelist())  # the path is in it
    assert ours(root / 'e.pkl') == []


# ---------------------------------------------------------------- load_checkpoint (a CDS learner's learn.load) across learners with and without heads
def _one_step(learn):
    "One training step: weights, BatchNorm buffers and the optimizer state move away from a fresh start"
    learn.fit(1, 1e-2, cbs=Spy(100, after_batch=stop))
    return learn


def _file_state(f):
    "The model's state in a `learn.save` file (saved with or without the optimizer's)"
    state = torch.load(f, map_location="cpu", weights_only=False)
    return state["model"] if set(state) == {"model", "opt"} else state


def test_a_plain_checkpoint_loads_into_a_cds_learner_and_says_so(tmp_path, capsys):
    dls = small_dls()
    f = _one_step(no_bar(Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), path=tmp_path))).save("plain")
    saved = _file_state(f)
    learn = _one_step(tiny_learner(dls, path=tmp_path))  # trained a step: its own weights and optimizer state
    heads = snapshot(learn.model.heads)
    capsys.readouterr()
    learn.load("plain")
    out = capsys.readouterr().out
    backbone = learn.model.model.state_dict()
    assert backbone.keys() == saved.keys()
    for k, v in saved.items(): assert torch.equal(backbone[k], v), k
    for k, v in learn.model.heads.state_dict().items(): assert torch.equal(v, heads[k]), k  # the heads are as they were
    assert out.splitlines() == [
        f"load plain.pth: saved without heads: loaded the backbone ({len(saved)} tensors), the heads keep their initial weights",
        "load plain.pth: its optimizer state, for a model without heads, is not loaded: the optimizer starts afresh"]
    assert not any("grad_avg" in learn.opt.state[p] for p in learn.model.parameters())  # afresh: no Adam moments of the old weights
    _one_step(learn)  # and it trains, heads included
    assert any("grad_avg" in learn.opt.state[p] for p in learn.model.heads.parameters())


def test_a_cds_checkpoint_loads_into_a_plain_learner_and_says_so(tmp_path, capsys):
    "A checkpoint with heads and distillation's adapters, loaded by a plain learner (deployment): the backbone only"
    dls = small_dls()
    teacher = tiny_learner(dls)
    learn = _one_step(no_bar(Learner(dls, tiny_cnn(widths=(8, 16, 24)), loss_func=CrossEntropyLossFlat(), path=tmp_path,
                                     cbs=CDSCallback(verbose=False, teacher=teacher))))
    saved = _file_state(learn.save("cds"))
    n_heads, n_aux = len(learn.model.heads.state_dict()), len(learn.model.aux.state_dict())
    assert n_heads and n_aux and len(saved) == n_heads + n_aux + len(learn.model.model.state_dict())
    plain = no_bar(Learner(dls, tiny_cnn(widths=(8, 16, 24)), loss_func=CrossEntropyLossFlat(), path=tmp_path))
    capsys.readouterr()
    load_checkpoint(plain, "cds")  # a plain learner's own `load` is fastai's
    out = capsys.readouterr().out
    sd = plain.model.state_dict()
    assert {f"model.{k}" for k in sd} == {k for k in saved if k.startswith("model.")}
    for k, v in sd.items(): assert torch.equal(v, saved[f"model.{k}"]), k
    n = len(sd)
    assert out.splitlines() == [
        f"load cds.pth: saved with heads: loaded the backbone ({n} tensors), ignored {n_heads} head tensors, {n_aux} tensors of distill",
        "load cds.pth: its optimizer state, for a model with heads, is not loaded: the optimizer starts afresh"]
    # the plain learner predicts as the CDS learner's plain model
    x = dls.valid.one_batch()[0]
    plain.model.eval(); learn.model.eval()
    with torch.no_grad(): torch.testing.assert_close(plain.model(x), learn.model.model(x), rtol=0, atol=0)


def test_same_kind_loads_say_nothing_and_another_architecture_still_fails(tmp_path, capsys):
    dls = small_dls()
    learn = tiny_learner(dls, path=tmp_path)
    learn.save("same")
    plain = no_bar(Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), path=tmp_path))
    plain.save("plain")
    capsys.readouterr()
    tiny_learner(dls, path=tmp_path).load("same", with_opt=False)  # (saved before any fit: no optimizer state)
    load_checkpoint(no_bar(Learner(dls, tiny_cnn(), loss_func=CrossEntropyLossFlat(), path=tmp_path)), "plain", with_opt=False)
    assert capsys.readouterr().out == ""
    # other widths: fastai's size mismatch, in both kinds of learner
    other = lambda cbs=None: no_bar(Learner(dls, tiny_cnn(widths=(4, 8, 16)), loss_func=CrossEntropyLossFlat(), path=tmp_path, cbs=cbs))
    for f in ("same", "plain"):
        for cbs in (None, CDSCallback(verbose=False)):
            with pytest.raises(RuntimeError, match="size mismatch"): load_checkpoint(other(cbs), f, with_opt=False)


def test_a_partial_load_says_what_it_left_out(tmp_path, capsys):
    "strict=False loads what fits and prints what did not (fastai's load is silent, even when nothing fits)"
    dls = small_dls()
    longer = nn.Sequential(*tiny_cnn(), nn.Linear(10, 10))  # a fifth module ('6') the plain model lacks
    f = no_bar(Learner(dls, longer, loss_func=CrossEntropyLossFlat(), path=tmp_path)).save("longer")
    saved = _file_state(f)
    learn = tiny_learner(dls, path=tmp_path)
    n_backbone = len(learn.model.model.state_dict())
    capsys.readouterr()
    learn.load("longer", strict=False, with_opt=False)
    out = capsys.readouterr().out.strip()
    assert out == (f"load longer.pth: saved without heads: loaded {n_backbone} of the {n_backbone} tensors of the backbone; "
                   "not in the model: 2 (6.weight, 6.bias), the heads keep their initial weights")
    for k, v in learn.model.model.state_dict().items(): assert torch.equal(v, saved[k]), k
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="Unexpected key"): learn.load("longer")  # strict: fastai's failure
    # a file with nothing in common: every tensor missing, said
    torch.save({"a.weight": torch.zeros(1)}, tmp_path / "models" / "alien.pth")
    learn.load("alien", strict=False, with_opt=False)
    out = capsys.readouterr().out.strip()
    n = len(learn.model.state_dict())
    assert out.startswith(f"load alien.pth: loaded 0 of the {n} tensors of the model; missing: ") and out.endswith("not in the model: 1 (a.weight)")


# ---------------------------------------------------------------- export_backbone: the trained backbone for torchvision and timm
def _rgb_dls():
    return small_dls(n_train=16, n_valid=4, size=32, n_channels=3, bs=8)


def _vision(arch, dls, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return no_bar(vision_learner(dls, arch, pretrained=False, path=path, cbs=CDSCallback(verbose=False), **kwargs))


def test_export_backbone_loads_into_torchvision_classification_and_detection_models(tmp_path):
    "From a folder named fastai_cds: exact keys into resnet18 (classifier missing only) and Faster R-CNN's ResNet18-FPN body"
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    root = tmp_path / "fastai_cds"
    root.mkdir()
    dls = _rgb_dls()
    learn = _one_step(_vision(resnet18, dls, root))
    f = export_backbone(learn, "backbone.pth")
    assert f == root / "backbone.pth"
    sd = torch.load(f, weights_only=True)
    assert set(sd) == set(resnet18().state_dict()) - {"fc.weight", "fc.bias"}
    assert not any(k.startswith(("heads.", "model.", "0.")) for k in sd)
    tv = resnet18(num_classes=7)
    res = tv.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    det = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None), num_classes=3, min_size=64, max_size=64)
    res = det.backbone.body.load_state_dict(sd)  # strict
    assert res.missing_keys == [] and res.unexpected_keys == []
    # the same features: the learner's body, torchvision's model without pool and classifier, the detection body's deepest map
    x = dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    for m in (learn.model, tv, det): m.eval()
    with torch.no_grad():
        ref = learn.model.model[0](x)
        torch.testing.assert_close(nn.Sequential(*list(tv.children())[:-2])(x), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(det.backbone.body(x)["3"], ref, rtol=1e-4, atol=1e-4)  # FrozenBatchNorm2d: the same BN, computed another way
        out = det([torch.rand(3, 64, 64)])
    assert len(out) == 1 and sorted(out[0]) == ["boxes", "labels", "scores"] and out[0]["boxes"].shape[1:] == (4,)


def test_export_backbone_fits_fasterrcnn_resnet50_fpn_as_the_readme_says(tmp_path):
    from torchvision.models import resnet50
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    learn = _vision(resnet50, _rgb_dls(), tmp_path)
    sd = torch.load(export_backbone(learn, "r50.pth"), weights_only=True)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64)  # small: a fast forward
    res = model.backbone.body.load_state_dict(sd)
    assert res.missing_keys == [] and res.unexpected_keys == []
    body = learn.model.model[0].state_dict()
    for k, v in model.backbone.body.state_dict().items():  # every tensor is the learner's: '0.4.1.conv2.weight' is 'layer1.1.conv2.weight'
        top, rest = k.split(".", 1)
        idx = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"].index(top)
        assert torch.equal(v, body[f"{idx}.{rest}"]), k
    with torch.no_grad(): out = model.eval()([torch.rand(3, 64, 64)])
    assert sorted(out[0]) == ["boxes", "labels", "scores"] and out[0]["boxes"].shape[1:] == (4,)
    # the README's other start: torchvision's frozen-BN backbone with the first stages frozen
    frozen = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    res = frozen.body.load_state_dict(sd)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert [n for n, p in frozen.body.named_parameters() if p.requires_grad][0].startswith("layer2.")


def test_export_backbone_timm(tmp_path):
    import timm
    dls = _rgb_dls()
    learn = _one_step(_vision("resnet18", dls, tmp_path))
    sd = torch.load(export_backbone(learn, "timm.pth", format="timm"), weights_only=True)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=7)
    assert set(sd) == set(tm.state_dict()) - {"fc.weight", "fc.bias"}
    res = tm.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    x = dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    learn.model.eval(); tm.eval()
    with torch.no_grad(): torch.testing.assert_close(tm.forward_features(x), learn.model.model[0](x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="use format='timm'"): export_backbone(learn, "x.pth")


def test_export_backbone_of_a_learner_on_a_torchvision_model(tmp_path):
    "`Learner(dls, cifar_resnet(...))` (as recipes/cifar.py builds it): torchvision's names already, the classifier left out"
    from fastai_cds.architectures import cifar_resnet
    learn = no_bar(Learner(_rgb_dls(), cifar_resnet("resnet18", 10), loss_func=CrossEntropyLossFlat(), path=tmp_path,
                           cbs=CDSCallback(verbose=False)))
    sd = backbone_state(learn)
    same = cifar_resnet("resnet18", 4)
    res = same.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    for k, v in learn.model.model.state_dict().items():
        if not k.startswith("fc."): assert torch.equal(sd[k], v), k


def test_export_backbone_bad_input(tmp_path):
    learn = tiny_learner(small_dls(), path=tmp_path)
    with pytest.raises(ValueError, match=r"format='torchvision'\) needs .*Sequential"): export_backbone(learn)
    with pytest.raises(ValueError, match=r"format='timm'\) needs a timm model"): export_backbone(learn, format="timm")
    with pytest.raises(ValueError, match="format must be 'torchvision' or 'timm', got 'onnx'"): export_backbone(learn, format="onnx")
    grey = _vision(resnet18, small_dls(n_train=16, n_valid=4, size=32, bs=8), tmp_path, n_in=1)
    with pytest.raises(ValueError, match=r"does not fit torchvision's resnet18: conv1.weight \(64, 1, 7, 7\) \(torchvision: \(64, 3, 7, 7\)\)"):
        export_backbone(grey)
    assert not list(tmp_path.glob("*.pth"))  # nothing written
