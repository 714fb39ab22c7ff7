"""End-to-end tests of the recipes: every `recipes/*.py` runs its `--smoke` in a subprocess, exports a model that loads
where fastai_cds cannot be imported, leaves no temporary folder behind, and a failed download gives one line; every
recipe's `--help` lists the shared options with the same help texts. The recipes' pieces live in the package and are
tested with it (test_recipe.py, test_architectures.py, test_views.py); no test imports a recipe file.

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


# Recipe runs: every recipe's smoke, then more options of the two dataset recipes (`slow`). Each job runs the recipe with
# a temporary folder of its own (TMPDIR) and `--export`, then loads the export in a process without fastai_cds; the
# quick start exports where a smoke run does by default (a temporary folder). Nothing of ours may be left in TMPDIR.
# Jobs run two at a time in the background from the first test of this file on (each is one thread, mostly importing
# fastai), and `test_recipe` collects their results; `test_help` reads every recipe's --help in one more process.
FAST = [p.stem for p in RECIPES if p.stem not in ('finegrained', 'imagenet')]  # CI's time: their ResNet smokes (15-20 s) are slow
SLOW = ['finegrained', 'imagenet', 'finegrained --no-pretrained --method dhm'] + [  # Table 6 (fine-tuned) and Table 5 (from scratch)
    'cifar --fp16 --channels-last --method dsn --schedule one-cycle --no-in-memory --no-bar'] + [  # bf16 on the CPU, fastai's loading, no bars
    f'cifar --method {m}' for m in ('base', 'dks', 'dhm', 'cds-simclr')] + [
    'cifar --cutout 0 --seed 1', 'cifar --arch mobilenetv2 --fp16',
    'finegrained --no-pretrained --fp16 --channels-last', 'finegrained --method base --arch resnet18', 'imagenet --no-reference-stem --method dks']
JOBS = {k: (ROOT/'recipes'/f"{k.split()[0]}.py", ['--smoke', *k.split()[1:]]) for k in FAST + SLOW}
DEFAULT_EXPORT = 'quickstart'  # the job that leaves --export to its default


def run_job(recipe:Path, args:list, tmp:Path, load:Loader)->tuple:
    "(the run, what loading its export without fastai_cds gave, the folders of ours it left in its TMPDIR)"
    export, tmpdir = tmp/'export'/'model.pkl', tmp/'tmp'
    tmpdir.mkdir()
    r = run(recipe, *args, *([] if recipe.stem == DEFAULT_EXPORT else ['--export', export]), env={'TMPDIR': str(tmpdir)})
    left = sorted(p.name for p in tmpdir.iterdir() if p.name.startswith('cds_'))  # ours: cds_smoke_*, cds_run_* (torch keeps caches there too)
    return r, load(export) if r.returncode == 0 and export.exists() else None, tmpdir, left


HELP = textwrap.dedent("""
    import contextlib, io, json, runpy, sys, warnings
    warnings.filterwarnings('ignore')
    texts = {}
    for path in sys.argv[1:]:
        sys.argv, out = [path, '--help'], io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit): runpy.run_path(path, run_name='__main__')
        texts[path] = out.getvalue()
    print(json.dumps(texts))
""")


def help_texts()->dict:
    "{recipe: {option: its help text}} from every recipe's `--help`, the recipes run as scripts in one process (fastai imported once)"
    r = subprocess.run([sys.executable, '-c', HELP, *map(str, RECIPES)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**ENV, 'COLUMNS': '2000'})  # one line per option
    assert r.returncode == 0, r.stderr[-3000:]
    line = re.compile(r'^  --([\w-]+)(?:, --[\w-]+)?(?: \(\w+\))?\s{2,}(.*)$')
    return {Path(k).stem: {m[1].replace('-', '_'): m[2] for l in v.splitlines() if (m := line.match(l))} for k, v in json.loads(r.stdout).items()}


@pytest.fixture(scope='module', autouse=True)
def jobs(request, tmp_path_factory):
    "The recipe runs of the selected `test_recipe` cases (and the --help texts), two at a time in the background"
    tests = request.session.items
    wanted = [it.callspec.params['job'] for it in tests if it.originalname == 'test_recipe' and hasattr(it, 'callspec')]
    pool, load = ThreadPoolExecutor(2), Loader()
    futures = {k: pool.submit(run_job, *JOBS[k], tmp_path_factory.mktemp('job'), load) for k in JOBS if k in wanted}
    if any(it.originalname == 'test_help' for it in tests): futures['help'] = pool.submit(help_texts)
    yield futures
    pool.shutdown(cancel_futures=True)
    load.close()


def offline(recipe, tmp_path, *args):
    "Run `recipe` where fastai has no data yet and every download is refused at once"
    env = {'FASTAI_HOME': str(tmp_path/'fastai'), 'TORCH_HOME': str(tmp_path/'torch'), 'no_proxy': '', 'NO_PROXY': '',
           **{k: UNREACHABLE for k in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY')}}
    r = run(ROOT/'recipes'/recipe, *args, env=env, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    return r.stderr


@pytest.mark.parametrize('recipe,dataset,url', [pytest.param('cifar.py', 'cifar10', 'CIFAR', marks=pytest.mark.slow),  # CI's time: 17 s
    pytest.param('distill.py', 'cifar10', 'CIFAR', marks=pytest.mark.slow),  # the same message (`dataset_path`): slow, for CI's time
    pytest.param('semisup.py', 'cifar100', 'CIFAR_100', marks=pytest.mark.slow)])
def test_offline(recipe, dataset, url, tmp_path):
    "A failed download: one line naming the URL tried and --path, which takes a local copy, exit status 1, no traceback"
    from fastai.data.external import URLs
    err = offline(recipe, tmp_path, '--dataset', dataset, '--epochs', 1)
    assert err.count('\n') == 1 and err.startswith('Could not download') and getattr(URLs, url) in err and '--path' in err, err


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


@pytest.mark.slow  # CI's time: 18 s (test_offline checks the same refusal path for CIFAR)
def test_imagenet_without_path(tmp_path):
    "fastai has no ImageNet download: without --path, one line on how to pass a local copy"
    err = offline('imagenet.py', tmp_path)
    assert err.count('\n') == 1 and 'ImageNet' in err and '--path' in err and 'train/ and val/' in err, err


# ---- the recipe runs started in the background by `jobs`, collected last

def table(out:str)->list[dict]:
    "The rows of the last markdown table in `out`"
    lines = [l for l in out.splitlines() if l.startswith('| ')]
    start = max(i for i, l in enumerate(lines) if set(l) <= set('|- ') and i)  # the line under the header
    cells = lambda l: [c.strip() for c in l.strip().strip('|').split('|')]
    return [dict(zip(cells(lines[start - 1]), cells(l))) for l in lines[start + 1:]]


@pytest.mark.parametrize('job', FAST + [pytest.param(k, marks=pytest.mark.slow) for k in SLOW])
def test_recipe(job, jobs):
    "The recipe runs end to end on data made on the spot, exports a plain Learner which loads without fastai_cds, prints one table, leaves nothing"
    r, load, tmpdir, left = jobs[job].result()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    name = JOBS[job][0].stem
    if name == DEFAULT_EXPORT:  # --smoke's default export: in a temporary folder, removed at the end
        said = re.findall(r'exported the CDS model to (\S+\.pkl)', r.stdout)
        assert len(said) == 1 and Path(said[0]).is_relative_to(tmpdir) and not Path(said[0]).exists(), r.stdout[-2000:]
    else:
        said = re.findall(r'\S+\.pkl', r.stdout)
        assert load is not None, "asked for --export PATH, got no file there" + (f" (the recipe named {said})" if said else '')
        assert load[0], f"the export does not load without fastai_cds: {load[1]}"
    assert not left, f"left behind in TMPDIR: {left}"
    rows = table(r.stdout)  # the result table, the same format in every recipe
    assert rows and all('smoke' in row['dataset'] and float(row['top-1 (%)']) >= 0 for row in rows), r.stdout[-2000:]
    if name == 'quickstart': assert [row['method'] for row in rows] == ['baseline', 'CDS'], rows
    if name == 'distill': assert [row['model'] for row in rows] == ['teacher', 'student'], rows
    if name in ('cifar', 'imagenet', 'semisup'): assert rows[0]['best top-1 (%)'].endswith('(epoch 1)'), rows
    if name == 'imagenet': assert rows[0]['top-5 (%)'] and rows[0]['top-5 then (%)'], rows
    paper = {'finegrained': '82.10', 'finegrained --no-pretrained --method dhm': '64.01',  # cub's, the setting's and the method's
             'finegrained --method base --arch resnet18': None, 'distill': None}  # the paper has no ResNet18 fine-grained, no digits
    if job in paper: assert rows[-1].get('paper top-1 (%)') == paper[job], rows
    if '--method dsn' in job: assert 'DSNCallback: 3 heads' in r.stdout
    if '--no-bar' in job:  # fastai's table of epochs, one plain line each
        assert '\r' not in r.stdout and '\u2588' not in r.stdout and re.search(r'^epoch +train_loss +valid_loss', r.stdout, re.M), r.stdout[-2000:]


SHARED_BUT = {'cifar': {'pretrained'}, 'imagenet': {'pretrained'}, 'quickstart': {'path', 'workers', 'pretrained'}}  # options that do not apply


def test_help(jobs):
    "Every recipe's --help lists every shared option that applies to it, each with the same help text, written once (`RecipeRun`)"
    from fastcore.docments import docments
    from fastai_cds.recipe import RecipeRun
    shared = {k: v for k, v in docments(RecipeRun).items() if k not in ('self', 'name', 'command', 'return')}  # command: not an option
    texts = jobs['help'].result()
    assert set(texts) == {p.stem for p in RECIPES}
    for recipe, options in texts.items():
        expected = {k: v for k, v in shared.items() if k not in SHARED_BUT.get(recipe, ())}
        said = {k: options.get(k) for k in expected}  # the help text, then argparse's ' (default: ...)' where there is one
        assert all(t == expected[k] or t.startswith(expected[k] + ' (default: ') for k, t in said.items() if t), (recipe, said)
        assert None not in said.values(), (recipe, [k for k, t in said.items() if t is None])
        assert not set(shared) & SHARED_BUT.get(recipe, set()) & set(options), recipe


def readme_block(after:str)->str:
    "The first code block of README.md after the line that starts with `after`"
    text = (ROOT/'README.md').read_text()
    return text.split('\n' + after, 1)[1].split('```\n', 1)[1].split('\n```', 1)[0]


@pytest.mark.slow
def test_quickstart_as_the_readme_writes_it(tmp_path):
    """`python recipes/quickstart.py`, the README's quick start as written (from the clone's root, the user's environment),
    prints what the README shows: the same first line (the thread count is the machine's), the same table but for the train
    times (the figures are this machine's; another CPU may round differently, so top-1 within one image of 359 and ECE,
    loss within 0.5 / 0.02) and the export line with the clone's folder for `/path/to/fastai_cds`; the export loads
    without fastai_cds. A quickstart.pkl already in the clone is put back."""
    shown, kept, out = readme_block('What the quick start prints'), tmp_path/'kept.pkl', ROOT/'quickstart.pkl'
    if out.exists(): out.rename(kept)
    load = Loader()
    try:
        r = subprocess.run([sys.executable, 'recipes/quickstart.py'], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        threads = re.compile(r'\d+ CPU threads')
        assert threads.sub('N', r.stdout.splitlines()[0]) == threads.sub('N', shown.splitlines()[0]), r.stdout[:300]
        got, want = table(r.stdout), table(shown)
        assert [{k: row[k] for k in ('dataset', 'labels', 'method', 'epochs')} for row in got] == [
            {k: row[k] for k in ('dataset', 'labels', 'method', 'epochs')} for row in want], got
        for g, w in zip(got, want):
            for k, tol in (('top-1 (%)', 100/359 + 1e-6), ('ECE (%)', 0.5), ('valid loss', 0.02)):
                assert abs(float(g[k]) - float(w[k])) <= tol, (k, g, w)
        said = shown.splitlines()[-1].replace('/path/to/fastai_cds', str(ROOT))
        assert r.stdout.splitlines()[-1] == said, (r.stdout.splitlines()[-1], said)
        ok, what = load(out)
        assert ok, what
    finally:
        load.close()
        out.unlink(missing_ok=True)
        if kept.exists(): kept.rename(out)
