"""End-to-end tests of the recipes: every `recipes/*.py` runs its `--smoke` (or tiny arguments) in a subprocess, exports
a model that loads where fastai_cds cannot be imported, and a failed download gives one clear message. The recipes'
pieces live in the package and are tested with it (test_training.py, test_models.py, test_views.py); no test imports a
recipe file.

The subprocesses run with one intra-op thread (tiny models on a shared 2-core machine). `-m slow` adds every method,
schedule and option of the two dataset recipes."""
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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
FAST = list(JOBS) + ['cifar --fp16 --channels-last --method dsn --schedule one-cycle --no-in-memory']  # bf16 autocast on the CPU, a baseline, fastai's per-item loading
SLOW = ['finegrained --no-pretrained --method dhm'] + [  # Table 5 (from scratch)
    f'cifar --method {m}' for m in ('base', 'dks', 'dhm', 'cds-simclr')] + [
    'cifar --no-cifar-stem', 'cifar --cutout 0 --seed 0', 'cifar --arch resnet34 --fp16',
    'finegrained --no-pretrained --fp16 --channels-last', 'finegrained --method base --arch resnet18', 'imagenet --reference-stem --method dks']
for k in FAST[len(JOBS):] + SLOW:
    name, *args = k.split()
    JOBS[k] = (ROOT/'recipes'/f'{name}.py', ['--smoke', *args])


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
    pytest.param('distill.py', 'CIFAR', 'CIFAR', '--dataset', marks=pytest.mark.slow),  # the same message (`training.get_data`): slow, for CI's time
    pytest.param('semisup.py', 'CIFAR_100', 'CIFAR_100', '--dataset', marks=pytest.mark.slow)])
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


# ---- the recipe runs started in the background by `jobs`, collected last

@pytest.mark.parametrize('job', FAST + [pytest.param(k, marks=pytest.mark.slow) for k in SLOW])
def test_recipe(job, jobs):
    "The recipe runs end to end on data made on the spot, exports a plain Learner to --export, which loads without fastai_cds"
    r, load = jobs[job].result()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    said = re.findall(r'\S+\.pkl', r.stdout)
    assert load is not None, "asked for --export PATH, got no file there" + (f" (the recipe named {said})" if said else '')
    assert load[0], f"the export does not load without fastai_cds: {load[1]}"
    if JOBS[job][0].stem in ('cifar', 'imagenet', 'finegrained'):  # the table: last and best top-1, and the paper's number
        header, _, row = [l for l in r.stdout.splitlines() if l.startswith('| ')][-3:]
        table = dict(zip([c.strip() for c in header.split('|')], [c.strip() for c in row.split('|')]))
        assert 'smoke' in table['dataset'] and table['top-1 (%)'], r.stdout[-2000:]
        if JOBS[job][0].stem != 'finegrained': assert table['best top-1 (%)'].endswith('(epoch 1)'), table
        if JOBS[job][0].stem == 'imagenet': assert table['top-5 (%)'] and table['top-5 then (%)'], table
        if JOBS[job][0].stem == 'finegrained':  # the paper's number of the dataset (cub), the setting and the method run
            assert table['paper top-1 (%)'] == ('64.01' if '--no-pretrained --method dhm' in job else '82.10' if job == 'finegrained' else table['paper top-1 (%)']), table
    if '--method dsn' in job: assert 'DSNCallback: 3 heads' in r.stdout


def test_imagenet_without_path(tmp_path):
    "fastai has no ImageNet download: without --path, one line on how to pass a local copy"
    err = offline('imagenet.py', tmp_path)
    assert err.count('\n') == 1 and 'ImageNet' in err and '--path' in err and 'train/ and val/' in err, err
