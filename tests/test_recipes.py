"""End-to-end tests of the recipes: every `recipes/*.py` runs its `--smoke` (or tiny arguments) in a subprocess, exports
a model that loads where fastai_cds cannot be imported; a failed download gives one clear message; and the recipes'
own pieces (CIFAR stem, Cutout, step schedule, fine-grained layouts) checked in-process.

The subprocesses run with one intra-op thread (tiny models on a shared 2-core machine). `-m slow` adds every method,
schedule and option of the two dataset recipes."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT/'recipes').glob('*.py') if not p.name.startswith('_'))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
UNREACHABLE = 'http://127.0.0.1:9'  # the discard port: connections are refused at once, nothing waits on a timeout


def params(recipe:Path)->set:
    "Names of the parameters of a recipe's `call_parse` function (read from its source: importing it is slow)"
    return set(re.findall(r'^\s{4}(\w+)\s*:[^\n]*?(?:=|#)', recipe.read_text(), re.M))


def run(recipe:Path, *args, env=None, timeout=600)->subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(recipe), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


LOADER = textwrap.dedent("""
    import json, sys, warnings
    sys.modules['fastai_cds'] = None  # any reference to fastai_cds in a pickle fails to import
    warnings.filterwarnings('ignore')
    from fastai.learner import load_learner
    for line in sys.stdin:
        try:
            learn = load_learner(line.strip())
            objs = [*learn.model.modules(), *learn.cbs, learn.loss_func, *learn.dls.after_batch.fs]
            bad = [type(o).__qualname__ for o in objs if type(o).__module__.startswith('fastai_cds')]
            res = (False, f'objects of fastai_cds inside: {bad}') if bad else (True, type(learn.model).__name__)
        except Exception as e: res = (False, f'{type(e).__name__}: {e}')
        print(json.dumps(res), flush=True)
""")


class Loader:
    "A process where fastai_cds cannot be imported, loading exports on request (it imports fastai once)"
    def __init__(self): self.proc, self.lock = None, threading.Lock()
    def __call__(self, fname:Path)->tuple:
        "(loaded without fastai_cds, what was loaded or why not)"
        with self.lock:
            if self.proc is None:
                self.proc = subprocess.Popen([sys.executable, '-c', LOADER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True, env=ENV)
            self.proc.stdin.write(f'{fname}\n'); self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        return tuple(json.loads(line)) if line else (False, 'the loading process died')
    def close(self):
        if self.proc is None: return
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def smoke_args(recipe:Path)->list:
    "`--smoke`, or tiny arguments for a recipe without it (the quick start: one epoch)"
    p = params(recipe)
    assert 'export' in p, f"{recipe.name} has no --export option"
    return ['--smoke'] if 'smoke' in p else ['--epochs', 1] if 'epochs' in p else []


# Recipe runs: every recipe's smoke, then more options of the two dataset recipes (`slow`). Each job runs the recipe with
# `--export`, then loads the export in a process without fastai_cds. Jobs run two at a time in the background from the
# first test of this file on (each is one thread, mostly importing fastai), and `test_recipe` collects their results.
CIFAR, FINE = ROOT/'recipes/cifar.py', ROOT/'recipes/finegrained.py'
JOBS = {'finegrained': (FINE, ['--smoke'])} if FINE in RECIPES else {}
JOBS.update({p.stem: (p, smoke_args(p)) for p in RECIPES})
FAST = list(JOBS) + ['cifar --fp16 --channels-last --method dsn --schedule one-cycle']  # bf16 autocast on the CPU, a baseline
SLOW = [f'cifar --method {m}' for m in ('base', 'dks', 'dhm', 'cds-simclr')] + [
    'cifar --no-cifar-stem', 'cifar --cutout 0 --seed 0', 'cifar --arch resnet34 --fp16',
    'finegrained --no-pretrained --fp16 --channels-last', 'finegrained --method dhm', 'finegrained --method base --arch resnet18']
for k in FAST[len(JOBS):] + SLOW:
    name, *args = k.split()
    JOBS[k] = ({'cifar': CIFAR, 'finegrained': FINE}[name], ['--smoke', *args])


def run_job(recipe:Path, args:list, export:Path, load:Loader)->tuple:
    r = run(recipe, *args, '--export', export)
    return r, load(export) if r.returncode == 0 and export.exists() else None


@pytest.fixture(scope='module', autouse=True)
def jobs(request, tmp_path_factory):
    "The recipe runs of the selected `test_recipe` cases, two at a time in the background"
    wanted = [it.callspec.params['job'] for it in request.session.items if it.originalname == 'test_recipe' and hasattr(it, 'callspec')]
    pool, load = ThreadPoolExecutor(2), Loader()
    futures = {k: pool.submit(run_job, *JOBS[k], tmp_path_factory.mktemp('export')/'model.pkl', load) for k in JOBS if k in wanted}
    yield futures
    pool.shutdown(cancel_futures=True)
    load.close()


def offline(recipe, tmp_path, *args):
    "Run `recipe` where fastai has no data yet and every download is refused at once"
    env = {'FASTAI_HOME': str(tmp_path/'fastai'), 'TORCH_HOME': str(tmp_path/'torch'), 'no_proxy': '', 'NO_PROXY': '',
           **{k: UNREACHABLE for k in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY')}}
    r = run(ROOT/'recipes'/recipe, *args, env=env, timeout=300)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    return r.stderr


@pytest.mark.parametrize('recipe,dataset,url,option', [('cifar.py', 'cifar10', 'CIFAR', '--path'),  # option: how to pass a local copy
    ('distill.py', 'CIFAR', 'CIFAR', '--dataset'), ('semisup.py', 'CIFAR_100', 'CIFAR_100', '--dataset')])
def test_offline(recipe, dataset, url, option, tmp_path):
    "A failed download: one line naming the URL tried and the option that takes a local copy, a non-zero exit, no traceback"
    from fastai.data.external import URLs
    err = offline(recipe, tmp_path, '--dataset', dataset, '--epochs', 1)
    assert err.count('\n') == 1 and err.startswith('Could not download') and getattr(URLs, url) in err and option in err, err


@pytest.mark.slow
def test_finegrained_offline(tmp_path):
    from fastai.data.external import URLs
    err = offline('finegrained.py', tmp_path, '--dataset', 'flowers', '--epochs', 1)
    assert err.count('Could not download') == 1 and URLs.FLOWERS in err and '--path' in err, err
    err = offline('finegrained.py', tmp_path, '--dataset', 'dogs')  # not a fastai dataset: asks for --path
    assert 'Stanford Dogs' in err and '--path' in err, err


@pytest.mark.slow
def test_finegrained_pretrained_offline(tmp_path):
    "ImageNet weights that cannot download: one message pointing to --no-pretrained"
    imgs = tmp_path/'data'
    for s in ('train', 'valid'):
        for c in 'ab':
            (imgs/s/c).mkdir(parents=True)
            for k in range(2):
                from PIL import Image
                Image.new('RGB', (40, 40), (k*90, 30, 200)).save(imgs/s/c/f'{k}.png')
    err = offline('finegrained.py', tmp_path, '--path', imgs, '--arch', 'resnet18', '--epochs', 1, '--workers', 0)
    assert err.count('Could not download the ImageNet weights') == 1 and '--no-pretrained' in err, err


# ---- the recipes' own pieces, in-process

def load_recipe(name):
    "Import a recipe as a module (`call_parse` runs the CLI only when the file is run as a script)"
    spec = importlib.util.spec_from_file_location(f'recipe_{name}', ROOT/'recipes'/f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def cifar(): return load_recipe('cifar')


@pytest.fixture(scope='module')
def fine(): return load_recipe('finegrained')


@pytest.mark.parametrize('arch', ['resnet18', pytest.param('resnet50', marks=pytest.mark.slow), pytest.param('wide_resnet50_2', marks=pytest.mark.slow)])
def test_cifar_stem_stages(cifar, arch):
    "With the CIFAR stem, fastai's model keeps 4 downsampling stages at /1, /2, /4, /8 of a 32x32 input; fastai's splitter for the arch still applies"
    from fastai.vision.learner import create_vision_model, default_split, model_meta
    from fastai_cds.stages import find_stages
    orig = cifar.torch_arch(arch)
    fn = cifar.with_cifar_stem(orig)
    m = create_vision_model(fn, 10, pretrained=False, concat_pool=False, lin_ftrs=[], ps=0., first_bn=False)
    stem = m[0][0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1)) and isinstance(m[0][3], torch.nn.Identity)
    stages, final = find_stages(m, torch.randn(2, 3, 32, 32))
    assert [s.reduction for s in stages] == [1, 2, 4, 8] and final.size == (4, 4)
    assert model_meta[fn]['split'] is model_meta.get(orig, {'split': default_split})['split']  # resnets: 3 parameter groups


def test_cifar_stem_rejects_other_archs(cifar):
    from fastcore.script import CliError
    with pytest.raises(CliError, match='no-cifar-stem'): cifar.with_cifar_stem(cifar.torch_arch('squeezenet1_1'))(num_classes=10)


def test_cutout(cifar):
    "One zero square of at most 16x16 (clipped at the borders) per image, at its own place; validation untouched"
    from fastai.torch_core import TensorImage
    x = TensorImage(torch.ones(64, 3, 32, 32))
    tfm = cifar.Cutout(16)
    y = tfm(x, split_idx=0)
    holes = (y == 0).all(1)  # (n, h, w)
    area = holes.flatten(1).sum(1)
    assert (area > 0).all() and (area <= 256).all() and (area == 256).float().mean() > 0.1
    assert len({tuple(h.nonzero()[0].tolist()) for h in holes}) > 8  # not the same place in every image
    assert torch.equal(tfm(x, split_idx=1), x)


def test_step_schedule(cifar):
    "lr 0.1, /10 at epochs 90, 180 and 280 of 300 (as fractions of training)"
    f = cifar.step_schedule(0.1)
    lrs = [f(torch.tensor(e/300)) for e in (0, 89.9, 90.1, 179.9, 180.1, 279.9, 280.1, 299.9)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-6)


@pytest.mark.parametrize('name', ['distill', 'semisup'])
def test_dataset_not_found(name):
    "--dataset neither digits, a folder nor a fastai URLs name: one message, no download tried"
    from fastcore.script import CliError
    with pytest.raises(CliError, match='--dataset CIFAR10: not digits, a folder or a fastai URLs name'): load_recipe(name).get_path('CIFAR10')


def touch(path:Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'')


def test_layout_imagenet_style(fine, tmp_path):
    for s, n in (('train', 3), ('val', 1)):
        for c in ('cat', 'dog'):
            for k in range(n): touch(tmp_path/s/c/f'{k}.jpg')
    df = fine.split_table(tmp_path)
    assert len(df) == 8 and df.is_valid.sum() == 2 and set(df.label) == {'cat', 'dog'}
    assert all((tmp_path/f).exists() for f in df.file)


def test_layout_cub(fine, tmp_path):
    "CUB's official split files, inside the CUB_200_2011/ folder of fastai's archive"
    root = tmp_path/'CUB_200_2011'
    ims = ['001.Albatross/a_1.jpg', '001.Albatross/a_2.jpg', '002.Auklet/b_1.jpg', '002.Auklet/b_2.jpg']
    for f in ims: touch(root/'images'/f)
    (root/'images.txt').write_text(''.join(f'{i+1} {f}\n' for i, f in enumerate(ims)))
    (root/'train_test_split.txt').write_text('1 1\n2 0\n3 1\n4 0\n')
    df = fine.split_table(tmp_path)
    assert list(df.label) == ['001.Albatross', '001.Albatross', '002.Auklet', '002.Auklet']
    assert list(df.is_valid) == [False, True, False, True] and all((tmp_path/f).exists() for f in df.file)


def test_layout_split_lists(fine, tmp_path):
    "fastai's Oxford Flowers-102: jpg/ with train.txt, valid.txt (both training) and test.txt (validation)"
    for k in range(6): touch(tmp_path/'jpg'/f'image_{k}.jpg')
    (tmp_path/'train.txt').write_text('jpg/image_0.jpg 0\njpg/image_1.jpg 1\n')
    (tmp_path/'valid.txt').write_text('jpg/image_2.jpg 0\njpg/image_3.jpg 1\n')
    (tmp_path/'test.txt').write_text('jpg/image_4.jpg 0\njpg/image_5.jpg 1\n')
    df = fine.split_table(tmp_path)
    assert list(df.is_valid) == [False]*4 + [True]*2 and list(df.label) == ['0', '1']*3


def test_layout_cars_annos(fine, tmp_path):
    "Stanford Cars' cars_annos.mat: relative_im_path, class (1-based into class_names), test flag"
    from scipy.io import savemat
    rec = np.zeros(4, dtype=[('relative_im_path', 'O'), ('class', 'O'), ('test', 'O')])
    for k in range(4):
        rec[k] = (f'car_ims/{k:06d}.jpg', k % 2 + 1, k // 2)
        touch(tmp_path/'car_ims'/f'{k:06d}.jpg')
    savemat(tmp_path/'cars_annos.mat', {'annotations': rec, 'class_names': np.array(['Audi TT', 'BMW M3'], dtype=object)})
    df = fine.split_table(tmp_path)
    assert list(df.label) == ['Audi TT', 'BMW M3']*2 and list(df.is_valid) == [False, False, True, True]


def test_layout_unknown(fine, tmp_path):
    from fastcore.script import CliError
    touch(tmp_path/'images'/'x.jpg')
    with pytest.raises(CliError, match='ImageNet-style'): fine.split_table(tmp_path)


# ---- the recipe runs started in the background by `jobs`, collected last

@pytest.mark.parametrize('job', FAST + [pytest.param(k, marks=pytest.mark.slow) for k in SLOW])
def test_recipe(job, jobs):
    "The recipe runs end to end on data made on the spot, exports a plain Learner to --export, which loads without fastai_cds"
    r, load = jobs[job].result()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    said = re.findall(r'\S+\.pkl', r.stdout)
    assert load is not None, "asked for --export PATH, got no file there" + (f" (the recipe named {said})" if said else '')
    assert load[0], f"the export does not load without fastai_cds: {load[1]}"
    if JOBS[job][0] in (CIFAR, FINE): assert re.search(r'^\| digits \(smoke\) ', r.stdout, re.M), r.stdout[-2000:]  # the table
    if '--method dsn' in job: assert 'DSNCallback: 3 heads' in r.stdout
