"""Every Python block of README.md and of the docs' hand-written pages (docs/pages/*.md) runs, on the digits; and every
case of the docs' bad-input table (docs/pages/20_bad_input.md) prints the message the table shows.

The blocks name a user's data (`dls`, `path`) and elide epochs (`fit_one_cycle(...)`): `PRELUDE` gives them the
digits and `SUBSTITUTIONS` the few epochs, once for every block. The blocks of one page run in order in one namespace (a
later block may use an earlier one's learner), each starting from the prelude's `dls`; a whole-line comment
`# load ...` under a line is output that line must print."""
import io, re, warnings
from contextlib import redirect_stdout
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT/'README.md', *sorted((ROOT/'docs'/'pages').glob('*.md'))]

PRELUDE = """
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.recipe import smoke_folder
dls = digits_dls(size=32, n_channels=3, label_fraction=0.05, valid_pct=0.05, bs=16)  # a user's DataLoaders: 72 digits
path = smoke_folder(32, 'test', n_train=8)  # a user's folder: train/ and test/, one subfolder per class
"""
SUBSTITUTIONS = {'(...)': '(1)', 'fit_one_cycle(5)': 'fit_one_cycle(1)'}  # elided arguments, epochs: one epoch


def python_blocks(page:Path)->list[str]:
    "The ```python blocks of `page`"
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S)


def test_python_blocks_found():
    assert len(python_blocks(ROOT/'README.md')) >= 1 and len(python_blocks(ROOT/'docs'/'pages'/'10_guide.md')) >= 4


SLOW_PAGES = {'15_distillation.md'}  # they train ResNet50s: the slow set


@pytest.mark.parametrize('page', [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_PAGES else p for p in PAGES
                                  if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    warnings.filterwarnings('ignore')
    ns = {}
    exec(PRELUDE, ns)
    user_dls = ns['dls']
    for i, block in enumerate(python_blocks(page)):
        for old, new in SUBSTITUTIONS.items(): block = block.replace(old, new)
        ns['dls'] = user_dls
        out = io.StringIO()
        with redirect_stdout(out): exec(compile(block, f'{page.name} block {i+1}', 'exec'), ns)
        for said in re.findall(r"^# (load .*)$", block, re.M): assert said in out.getvalue(), (said, out.getvalue())


BAD_PRELUDE = """
from fastai.vision.all import *
from fastai_cds.all import *
from fastai_cds.core import FiniteLossCallback
from fastai_cds.resume import CheckpointCallback
from PIL import Image
dls16 = digits_dls(size=16)
teacher16 = Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False))
class PlantNaN(Callback):
    def before_batch(self):
        if self.iter == 2: self.learn.xb = (self.xb[0] * float('nan'),)
valid_only_class = Path('data')
for split, classes in (('train', 'ab'), ('valid', 'abz')):
    for c in classes:
        (valid_only_class/split/c).mkdir(parents=True)
        for i in range(2): Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(valid_only_class/split/c/f'{i}.png')
not_a_checkpoint = Path('broken.pth'); not_a_checkpoint.write_bytes(b'not a checkpoint')
Path('afile').write_text('a file')
other_run = Path('other.pth')
l = Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CheckpointCallback(other_run, every=1, run=dict(method='semi', epochs=10)))
with l.no_bar(), l.no_logging(): l.fit(1)
"""
CASES = [
 ("batch size 1", "Learner(digits_dls(size=16, bs=1), small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)).fit(1)"),
 ("DataLoaders without labels", "Learner(DataLoaders(TfmdDL([(x,) for x in torch.rand(8, 1, 16, 16)], bs=4), TfmdDL([(x,) for x in torch.rand(4, 1, 16, 16)], bs=4)), small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)).fit(1)"),
 ("`layers=['nope']`", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(layers=['nope'], verbose=False))"),
 ("a stage index out of range, `layers=[5]`", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(layers=[5], verbose=False))"),
 ("a model without 4-D feature maps (an MLP)", "Learner(dls16, nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False))"),
 ("a model that already carries heads (`Learner(dls, learn.model, cbs=CDSCallback())`)", "Learner(dls16, Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)).model, loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False))"),
 ("two deep-supervision callbacks on one Learner", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[DSNCallback(verbose=False), CDSCallback(verbose=False)])"),
 ("a teacher with another number of heads", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[CDSCallback(layers=['3', '5'], verbose=False), DistillCallback(teacher16)])"),
 ("a teacher trained without CDS", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[CDSCallback(verbose=False), DistillCallback(Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat()))])"),
 ("a teacher without the stage a method needs (FitNet's hint stage 7 of 4)", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=distill_callbacks('fitnet', teacher16, pairs=[(1, 7)], verbose=False))"),
 ("CRD without item indices", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=distill_callbacks('crd', teacher16, verbose=False)).fit(1)"),
 ("an empty unlabelled DataLoader", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(unlabelled=TfmdDL([], bs=4), verbose=False)).fit(1)"),
 ("unlabelled images of another size", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(unlabelled=digits_dls(size=8, unlabelled=True, label_fraction=0.5)[1], verbose=False)).fit(1)"),
 ("a training set smaller than one batch (fastai drops the last short batch)", "Learner(digits_dls(size=16, bs=2048), small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CDSCallback(verbose=False)).fit(1)"),
 ("`tensor_dls` given (n, h, w, c) images", "tensor_dls((torch.zeros(8, 16, 16, 3, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)), (torch.zeros(4, 16, 16, 3, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)), ['a'], bs=4)"),
 ("`tensor_dls` given a label outside the vocab", "tensor_dls((torch.zeros(8, 3, 16, 16, dtype=torch.uint8), torch.full((8,), 12)), (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)), list('abc'), bs=4)"),
 ("`tensor_dls` given float labels", "tensor_dls((torch.zeros(8, 3, 16, 16, dtype=torch.uint8), torch.full((8,), 6.5)), (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)), list('abcdefg'), bs=4)"),
 ("`folder_tensor_dls` of a missing folder", "folder_tensor_dls(Path('no/such/folder'))"),
 ("`folder_tensor_dls` with a class only in the validation folder", "folder_tensor_dls(valid_only_class)"),
 ("a NaN or infinite input image (`FiniteLossCallback`, in every recipe)", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=FiniteLossCallback()).fit(1, cbs=PlantNaN())"),
 ("`resume` from a file that is not a checkpoint", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CheckpointCallback(not_a_checkpoint, resume=True)).fit(1)"),
 ("`resume` from another run's checkpoint", "CheckpointCallback(other_run, resume=True, run=dict(method='cds', epochs=10))"),
 ("a checkpoint path in a folder that is a file", "Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=CheckpointCallback(Path('afile')/'ck.pth', every=1)).fit(1)"),
 ("`export_backbone` of a model that is not torchvision's (or timm's)", "export_backbone(Learner(dls16, small_cnn(), loss_func=CrossEntropyLossFlat()), 'backbone.pth')"),
]


@pytest.fixture(scope='module')
def bad_ns(tmp_path_factory):
    import os
    old = os.getcwd(); os.chdir(tmp_path_factory.mktemp('bad'))
    ns = {}
    exec(BAD_PRELUDE, ns)
    yield ns
    os.chdir(old)


def shown(code:str, ns:dict)->str:
    "What `code` raises (or warns), as the table shows it: `Type: message`, without fastai's line about the event"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        try: exec(code, ns)
        except Exception as e: msg = f"{type(e).__name__}: {e}"
        else:
            ws = [x for x in w if 'CDS' in str(x.message)]
            msg = f"{ws[0].category.__name__}: {ws[0].message}" if ws else 'nothing'
    return re.sub(r"Exception occured in `\w+` when calling event `\w+`:\s*", '', msg)


@pytest.mark.parametrize('case,code', CASES, ids=[c for c,_ in CASES])
def test_bad_input(case, code, bad_ns):
    table = (ROOT/'docs'/'pages'/'20_bad_input.md').read_text()
    row = next((l for l in table.splitlines() if l.startswith(f'| {case} |')), None)
    assert row is not None, f"no row for {case!r} in the bad-input table"
    assert f"``{shown(code, bad_ns)}``" in row


def test_launch_commands_are_those_tested():
    "The docs' launch commands for 2 CPU processes are those `tests/test_parallel.py::test_readme_launch` runs as written"
    import test_parallel
    page = (ROOT/'docs'/'pages'/'30_distributed.md').read_text()
    commands = [l.split('#')[0].strip() for l in page.splitlines()]
    for k in ('cifar', 'accelerate'): assert test_parallel.README_LAUNCHES[k] in commands, k
