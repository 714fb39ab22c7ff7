"""timm backbones with CDS: channels-last maps (Swin) and token sequences (ViT, with class and register tokens), small
`pretrained=False` configurations at their native resolution. Stages are checked against timm's own `feature_info`
(widths) and `forward_intermediates` (the maps themselves); training runs a few steps; the export loads without
fastai_cds. Also: the error for a model without usable stages, and for a layout that cannot be told."""
import contextlib
import io
import json
import re
import textwrap

import pytest
import torch
import torch.nn as nn
from fastai.callback.core import Callback
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.learner import create_timm_model, vision_learner

from fastai_cds.cds import CDSCallback
from fastai_cds.model import DeepSupervisionModel
from fastai_cds.stages import StageInfo, find_stages

from helpers import BLOCKED, hooked_modules, no_bar, ours, run_children, small_dls

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("seeded")

# Small configurations of real timm architectures (timm's kwargs reduce depth and width), at their native size
SWIN = ("swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)))
VIT = ("vit_tiny_patch16_224", dict(depth=4, embed_dim=48, num_heads=3))           # a class token
VIT_REG = ("vit_little_patch16_reg4_gap_256", dict(depth=4, embed_dim=64, num_heads=2))  # 4 registers, no class token
TINY = {"swin": SWIN, "vit": VIT, "vit_reg": VIT_REG,
        "vit_cls_reg": ("vit_tiny_patch16_224", dict(depth=2, embed_dim=48, num_heads=3, reg_tokens=4)),  # class + 4 registers
        "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, embed_dim=48, num_heads=3)),  # class + distillation
        "vit_12": ("vit_tiny_patch16_224", dict(depth=12, embed_dim=24, num_heads=2)),
        "swinv2": ("swinv2_tiny_window8_256", dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))),
        "resnet18": ("resnet18", {}), "convnext": ("convnext_atto", {})}


def native_size(arch, kw):
    return timm.create_model(arch, pretrained=False, num_classes=0, **kw).pretrained_cfg["input_size"][1:]


def feature_widths(timm_model):
    "timm's own width for each feature module: {module name: num_chs}"
    fi = timm_model.feature_info
    if hasattr(fi, "module_name"): return dict(zip(fi.module_name(), fi.channels()))
    return {d["module"]: d["num_chs"] for d in fi}


def build(key, n_out=10):
    """The model a user trains, and the timm model inside it with the prefix of its modules' names: fastai's
    `create_timm_model` (what `vision_learner` builds), or the plain timm model for Swin (fastai's head cannot pool
    its channels-last features)"""
    arch, kw = TINY[key]
    if key.startswith("swin"):
        m = timm.create_model(arch, pretrained=False, num_classes=n_out, **kw)
        return m, m, ""
    m = create_timm_model(arch, n_out, pretrained=False, **kw)[0]
    return m, m[0].model, "0.model."


def timm_maps(timm_model, x, names):
    "timm's NCHW intermediates (prefix tokens dropped) at the feature modules `names`: the independent reference"
    order = list(feature_widths(timm_model))
    timm_model.eval()
    with torch.no_grad():
        if getattr(timm_model, "num_prefix_tokens", None) is not None:  # a ViT: its indices count blocks
            return timm_model.forward_intermediates(x, indices=[order.index(n) for n in names], intermediates_only=True)
        out = timm_model.forward_intermediates(x, intermediates_only=True)
    return [out[order.index(n)] for n in names]


# ---------------------------------------------------------------- stages: widths and maps as timm reports them
@pytest.mark.parametrize("key", ["swin", "swinv2", "vit", "vit_reg", "vit_cls_reg", "deit_distilled", "resnet18", "convnext"])
def test_stages_have_timm_widths_and_maps(key):
    "A channels-last or token stage is never misread: widths are timm's `feature_info`, maps are its `forward_intermediates`"
    model, inner, pre = build(key)
    size = native_size(*TINY[key]) if key not in ("resnet18", "convnext") else (64, 64)
    x = torch.randn(2, 3, *size)
    stages, final = find_stages(model, x)
    widths = feature_widths(inner)
    names = [s.name[len(pre):] for s in stages]
    assert [s.channels for s in stages] == [widths[n] for n in names]
    assert final == stages[-1]
    # the heads CDS builds take maps of these widths: their first conv, or (final head: pooling only) their output
    learn_heads = CDSCallback().make_heads(stages, final)
    for s, h in zip(stages[:-1], learn_heads[:-1]):
        assert next(m for m in h.modules() if isinstance(m, nn.Conv2d)).in_channels == widths[s.name[len(pre):]]
    # the maps the wrapper records are timm's own NCHW intermediates, value for value
    ds = DeepSupervisionModel(model, learn_heads, stages).eval()
    ds.arm()
    with torch.no_grad(): ds(x)
    taps = ds.read()
    assert not hooked_modules(model)
    ref = timm_maps(inner, x, names)
    for s, got, want in zip(stages, taps.stages, ref):
        assert got.shape == want.shape == (2, s.channels, *s.size), s
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [z.shape for z in taps.heads] == [(2, final.channels)] * len(stages)


def test_layouts_and_prefixes():
    "What each family's stages are: NHWC for Swin, tokens after the class/register/distillation tokens for ViTs"
    got = {}
    for key in ["swin", "vit", "vit_reg", "vit_cls_reg", "deit_distilled", "resnet18"]:
        model, _, _ = build(key)
        stages, _ = find_stages(model, torch.randn(2, 3, *native_size(*TINY[key])))
        got[key] = {(s.layout, s.prefix) for s in stages}
    assert got == {"swin": {("NHWC", 0)}, "vit": {("tokens", 1)}, "vit_reg": {("tokens", 4)},
                   "vit_cls_reg": {("tokens", 5)}, "deit_distilled": {("tokens", 2)}, "resnet18": {("NCHW", 0)}}


def test_vit_blocks_evenly_spaced():
    "An isotropic model's stages: `max_stages` blocks evenly spaced along the depth, the last one included"
    model, _, pre = build("vit_12")
    x = torch.randn(2, 3, 224, 224)
    stages, final = find_stages(model, x)
    assert [s.name for s in stages] == [pre + f"blocks.{k}" for k in (2, 5, 8, 11)]
    assert final.name == pre + "blocks.11" and final.size == (14, 14) and final.reduction == 16
    assert [s.name for s in find_stages(model, x, max_stages=3)[0]] == [pre + f"blocks.{k}" for k in (3, 7, 11)]
    assert [s.name for s in find_stages(model, x, layers=[0, -1])[0]] == [pre + "blocks.0", pre + "blocks.11"]
    s, _ = find_stages(model, x, layers=[pre + "blocks.6"])  # a name: its layout and prefix from the model
    assert s == [StageInfo(pre + "blocks.6", 24, (14, 14), 16, "tokens", 1)]


# ---------------------------------------------------------------- training and export
class HeadGrads(Callback):
    "After each backward: is every head parameter's gradient nonzero"
    order = 100
    def __init__(self): self.seen = []
    def after_backward(self):
        if self.training:
            self.seen.append([p.grad is not None and p.grad.abs().sum().item() > 0 for p in self.learn.model.heads.parameters()])


def cds_learner(key, dls):
    arch, kw = TINY[key]
    if key == "swin":  # fastai's vision_learner cannot pool Swin's channels-last features: the plain timm model
        learn = Learner(dls, timm.create_model(arch, pretrained=False, num_classes=dls.c, **kw), loss_func=CrossEntropyLossFlat(),
                        cbs=CDSCallback())
    else: learn = vision_learner(dls, arch, pretrained=False, cbs=CDSCallback(), **kw)  # fastai's TimmBody
    return no_bar(learn)


def train_and_export(key, fname):
    """Train `key` two steps with CDSCallback(), check the heads' gradients and the printed stages, export to `fname`;
    the batch and the trained plain model's predictions on it, and its state_dict keys"""
    arch, kw = TINY[key]
    dls = small_dls(n_train=10, n_valid=4, size=native_size(arch, kw)[0], n_channels=3, bs=4)
    learn, grads, printed = cds_learner(key, dls), HeadGrads(), io.StringIO()
    with contextlib.redirect_stdout(printed): learn.fit(1, 1e-3, cbs=grads)
    # two training steps, every head parameter got a gradient from its contrastive loss
    assert len(grads.seen) == 2 and all(all(s) for s in grads.seen), key
    ds = learn.model
    assert isinstance(ds, DeepSupervisionModel) and len(ds.heads) == 4 and all(isinstance(n, str) for n in ds.stages)
    assert all(len(learn.loss_terms.history[f"contra_{i}"]) == 2 for i in range(4))
    # the printed stages carry timm's widths
    inner, pre = (ds.model, "") if key == "swin" else (ds.model[0].model, "0.model.")
    shown, widths = re.findall(r"(\S+): (\d+)x\d+x\d+ \(", printed.getvalue()), feature_widths(inner)
    assert [n for n, _ in shown] == ds.stages
    assert [int(c) for _, c in shown] == [widths[n[len(pre):]] for n, _ in shown], printed.getvalue()
    plain = ds.model.eval()
    x = dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    with torch.no_grad(): pred = plain(x)
    learn.export(fname)
    assert not hooked_modules(plain)
    return x, pred, list(plain.state_dict())


@pytest.mark.parametrize("key", ["swin", "vit", "vit_reg"])
def test_train_and_export(key, tmp_path):
    "Swin, ViT (class token) and ViT (registers) train two steps with CDSCallback(); the export is the plain model"
    x, pred, keys = train_and_export(key, tmp_path / "m.pkl")
    assert ours(tmp_path / "m.pkl") == []  # loading it imports nothing of fastai_cds
    m = load_learner(tmp_path / "m.pkl").model.eval()
    assert list(m.state_dict()) == keys and not hooked_modules(m)
    with torch.no_grad(): torch.testing.assert_close(m(x), pred)


CHILD = BLOCKED + textwrap.dedent("""
    x, res, out = torch.load(f'{d}/x.pt'), {'blocked': blocked}, {}
    for key in sys.argv[2:]:
        m = load_learner(f'{d}/{key}.pkl').model.eval()
        with torch.no_grad(): out[key] = m(x[key])
        res[key] = {'keys': list(m.state_dict()), 'hooked': [n for n, k in m.named_modules() if k._forward_hooks]}
    res['loaded_cds_modules'] = [k for k, v in sys.modules.items() if k.startswith('fastai_cds') and v is not None]
    torch.save(out, f'{d}/out.pt')
    json.dump(res, open(f'{d}/res.json', 'w'))
""")


@pytest.mark.slow
def test_export_loads_without_fastai_cds(tmp_path):
    "The three exports load in a fresh process where fastai_cds cannot be imported: the plain keys and predictions"
    keys = ["swin", "vit", "vit_reg"]
    done = {k: train_and_export(k, tmp_path / f"{k}.pkl") for k in keys}
    torch.save({k: v[0] for k, v in done.items()}, tmp_path / "x.pt")
    run_children((CHILD, tmp_path, *keys))
    res, out = json.load(open(tmp_path / "res.json")), torch.load(tmp_path / "out.pt")
    assert res["blocked"] and res["loaded_cds_modules"] == []
    for k in keys:
        assert res[k]["keys"] == done[k][2] and res[k]["hooked"] == []
        torch.testing.assert_close(out[k], done[k][1])


# ---------------------------------------------------------------- errors
class PatchEmbed(nn.Module):
    "Patches of 4 x 4 as tokens (B, h*w, d), flattened inside, as timm's"
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Conv2d(3, d, 4, 4)
    def forward(self, x): return self.proj(x).flatten(2).transpose(1, 2)


class TinyTransformer(nn.Module):
    "A class token and two encoder layers on 4 x 4 patches; `flat_patches`: the patch conv a direct child (torchvision's ViT)"
    def __init__(self, d=16, flat_patches=False):
        super().__init__()
        self.flat_patches = flat_patches
        self.patch = nn.Conv2d(3, d, 4, 4) if flat_patches else PatchEmbed(d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(d, 2, 32, batch_first=True) for _ in range(2)])
        self.head = nn.Linear(d, 10)
    def forward(self, x):
        t = self.patch(x)
        if self.flat_patches: t = t.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        for b in self.blocks: t = b(t)
        return self.head(t[:, 0])


@pytest.mark.parametrize("flat", [False, True])
def test_no_usable_stages_lists_the_blocks(flat):
    "The error names the blocks (containers in a ModuleList returning tokens), not every module with a 3-D/4-D output"
    model, x = TinyTransformer(flat_patches=flat), torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="no usable stages") as ei:
        find_stages(model, x)
    msg = str(ei.value)
    listed = re.search(r"candidate stages \(blocks returning 3-D or 4-D tensors\): (.*?): pass `layers=`", msg).group(1)
    assert listed == "'blocks.0', 'blocks.1'", msg
    assert "('name', 'tokens', n)" in msg and "('name', 'NHWC')" in msg
    if flat: assert "ends at 'patch', and blocks of tokens follow" in msg
    assert not hooked_modules(model)
    # what the message says works: the blocks' tokens, the class token dropped, as 8 x 8 maps
    stages, final = find_stages(model, x, layers=[("blocks.0", "tokens", 1), ("blocks.1", "tokens", 1)])
    assert stages == [StageInfo(f"blocks.{k}", 16, (8, 8), 4, "tokens", 1) for k in (0, 1)] and final == stages[1]
    ds = DeepSupervisionModel(model, nn.ModuleList([nn.Identity(), nn.Identity()]), stages).eval()
    ds.arm()
    with torch.no_grad(): ds(x)
    got = ds.read().stages[0]
    with torch.no_grad():
        t = model.patch(x)
        t = t.flatten(2).transpose(1, 2) if flat else t
        t = model.blocks[0](torch.cat([model.cls.expand(2, -1, -1), t], 1))
    torch.testing.assert_close(got, t[:, 1:].transpose(1, 2).reshape(2, 16, 8, 8))


def test_layout_that_cannot_be_told():
    "17 tokens from a 32 x 32 input, prefix unknown: the error says how to name the layout; a bad spec is a TypeError"
    model, x = TinyTransformer(), torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"cannot tell how the output of 'blocks.0' \(2, 65, 16\) is laid out.*\('blocks.0', 'tokens', n\)"):
        find_stages(model, x, layers=["blocks.0"])
    with pytest.raises(ValueError, match="cannot tell"):  # 65 tokens are no grid of 64 + 0 or + 3
        find_stages(model, x, layers=[("blocks.0", "tokens", 3)])
    for bad in [("blocks.0", "NLC"), ("blocks.0", "NHWC", 1), ("blocks.0",), ("blocks.0", "tokens", -1)]:
        with pytest.raises(TypeError, match="name, 'tokens', number of prefix tokens"):
            find_stages(model, x, layers=[bad])


def test_fastai_timm_body_with_channels_last_features():
    "fastai's TimmBody around Swin: a clear error naming the fix, before any forward, nothing left on the model"
    model = create_timm_model(SWIN[0], 10, pretrained=False, **SWIN[1])[0]
    with pytest.raises(ValueError, match=r"cannot train swin_tiny_patch4_window7_224.*timm.create_model\('swin_tiny_patch4_window7_224', num_classes=dls.c\)"):
        find_stages(model, torch.randn(2, 3, 224, 224))
    assert not hooked_modules(model)


def test_tokens_out_of_raster_order_are_an_error():
    "Hiera's blocks return tokens in mask-unit order: the check against timm's forward_intermediates refuses to misread them"
    model = create_timm_model("hiera_tiny_224", 10, pretrained=False, embed_dim=24, num_heads=1, stages=(1, 1, 1, 1))[0]
    with pytest.raises(ValueError, match=r"read '0.model.blocks.0' \(2, 3136, 24\) as .*tokens\), but timm's `forward_intermediates` gives another map"):
        find_stages(model, torch.randn(2, 3, 224, 224))
    assert not hooked_modules(model)
