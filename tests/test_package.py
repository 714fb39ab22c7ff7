"""The package as published: its metadata (pyproject.toml, LICENSE), and (slow) `python -m build`'s sdist and wheel,
the wheel installed into a fresh virtual environment and the README's use snippet run there, outside the checkout."""
import json
import platform
import re
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from helpers import BLOCKED

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']


def test_license_file():
    "The LICENSE file is the Apache License 2.0 that pyproject.toml names, and goes into the distributions"
    text = (ROOT/'LICENSE').read_text()
    assert text.split('\n')[0].strip() == 'Apache License' and 'Version 2.0, January 2004' in text
    assert 'END OF TERMS AND CONDITIONS' in text and len(text) > 10_000
    assert PROJECT['license'] == 'Apache-2.0' and PROJECT['license-files'] == ['LICENSE']


def test_bounds_admit_what_is_tested():
    "Each dependency has a lower bound that the installed version (the one the tests run against) satisfies; so does Python"
    for req in map(Requirement, PROJECT['dependencies']):
        assert any(s.operator in ('>=', '==', '~=') for s in req.specifier), f'{req}: no lower bound'
        assert req.specifier.contains(version(req.name)), f'{req} excludes the tested {req.name} {version(req.name)}'
    assert SpecifierSet(PROJECT['requires-python']).contains(platform.python_version())
    v = sys.version_info
    assert f'Programming Language :: Python :: {v.major}.{v.minor}' in PROJECT['classifiers']
    assert [a['name'] for a in PROJECT['authors']] == ['fastai_cds contributors']


def readme_snippet() -> str:
    "The first python block of the README's 'Use it' section"
    text = (ROOT/'README.md').read_text()
    assert '\n## Use it\n' in text, "README.md has no '## Use it' section"
    section = text.split('\n## Use it\n', 1)[1]
    return section.split('```python\n', 1)[1].split('\n```', 1)[0]


@pytest.mark.slow
def test_wheel_in_fresh_venv(tmp_path):
    """`python -m build`: an sdist with the tests and a wheel with the package only, both with the LICENSE; the wheel
    installed into a fresh venv (`--system-site-packages`, `--no-index`: torch and the rest come from this machine) and the
    README's use snippet (one epoch) run from a folder outside the checkout on the digits: its export loads where fastai_cds cannot
    be imported, with exactly the keys of a plain resnet18 learner's model"""
    dist = tmp_path/'dist'
    subprocess.run([sys.executable, '-m', 'build', '--outdir', str(dist), str(ROOT)], check=True, capture_output=True)
    v = PROJECT.get('version') or __import__('fastai_cds').__version__
    whl, sdist = dist/f'fastai_cds-{v}-py3-none-any.whl', dist/f'fastai_cds-{v}.tar.gz'
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(f'fastai_cds-{v}.dist-info/METADATA').decode()
        assert z.read(f'fastai_cds-{v}.dist-info/licenses/LICENSE') == (ROOT/'LICENSE').read_bytes()
    assert {n for n in names if not n.startswith(f'fastai_cds-{v}.dist-info/')} == \
        {f'fastai_cds/{p.name}' for p in (ROOT/'fastai_cds').glob('*.py')}
    for line in ('License-Expression: Apache-2.0', 'Requires-Python: >=3.11', 'Author: fastai_cds contributors',
                 'Classifier: Programming Language :: Python :: 3.11', 'Requires-Dist: torch>=2.14',
                 'Requires-Dist: fastai>=2.8.12', 'Requires-Dist: fastcore>=2.2.41', 'Requires-Dist: torchvision>=0.29'):
        assert line in meta.splitlines(), line
    with tarfile.open(sdist) as t: snames = {n.split('/', 1)[1] for n in t.getnames() if '/' in n}
    for f in ('LICENSE', 'README.md', 'pyproject.toml', 'tests/conftest.py', 'tests/helpers.py', 'tests/test_losses.py',
              'nbs/12_cds.ipynb', 'nbs/nbsetup.py', 'recipes/quickstart.py', 'docs/build.py', 'fastai_cds/cds.py'):
        assert f in snames, f
    assert not [n for n in snames if '__pycache__' in n or n.startswith('bench/out') or n.endswith(('.pkl', '.pth'))]

    venv, outside = tmp_path/'venv', tmp_path/'outside'
    outside.mkdir()
    # without a pip (and its old setuptools, which would hide the machine's from torch's requirement): the machine's pip
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)], check=True)
    py = venv/'bin'/'python'
    # a clean environment: no PYTHONPATH to the checkout (pip would take its fastai_cds as installed already)
    env = {'PATH': f"{venv/'bin'}:/usr/bin:/bin", 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1', 'HOME': str(tmp_path)}
    r = subprocess.run([str(py), '-m', 'pip', 'install', '-q', '--no-index', str(whl)], cwd=outside, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    script = textwrap.dedent('''
        import json, sys, torch
        torch.set_num_threads(1)
        import fastai_cds
        assert fastai_cds.__file__.startswith(sys.prefix), fastai_cds.__file__  # the venv's: the wheel, not the checkout
        from fastai.vision.all import *
        from fastai_cds.all import *
        dls = digits_dls(size=32, n_channels=3)   # the README's `dls`: scikit-learn's digits, 3 channels for resnet18
        plain = list(vision_learner(dls, resnet18, pretrained=False).model.state_dict())
    ''') + re.sub(r'fit_one_cycle\(\d+', 'fit_one_cycle(1', readme_snippet()) + textwrap.dedent('''
        print(json.dumps({'file': fastai_cds.__file__, 'plain': plain}))
    ''')
    r = subprocess.run([str(py), '-c', script], cwd=outside, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out['file']).is_relative_to(venv), out['file']   # the wheel's package, not the checkout's
    check = BLOCKED + textwrap.dedent('''
        learn = load_learner(d + '/model.pkl')
        print(json.dumps({'blocked': blocked, 'keys': list(learn.model.state_dict())}))
    ''')
    r = subprocess.run([str(py), '-c', check, str(outside)], cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded['blocked'] and loaded['keys'] == out['plain']
