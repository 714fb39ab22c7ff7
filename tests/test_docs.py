"""The docs site's machinery (`docs/build.py`, `python -m docs`; `docs/browser.py`, `python -m docs.browser`).

A tiny notebook with a module of its own goes through the build: what the page must show (prose, saved outputs, each
API entry with its signature, docstring and docments) and leave out (hidden and exported source, private names), the
links it must make, and the problems that must fail the build (a missing docstring, a saved error, outputs over the
budget, a broken link or anchor). The real notebooks are held to the output budget here too; CI builds the real site
(`.ci/run`). The slow test builds the real site and looks at it in headless Chromium."""
import base64
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `docs` is the repository's tooling, not part of the package
from docs.build import (OUTPUT_BUDGET, DocsError, build, check_outputs, generate, output_bytes, page_name)  # noqa: E402

PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII='  # 1x1 pixel

MODULE = '''
def scale(x:float, # the value
          by:int=2, # the factor
         )->float: # the scaled value
    "Multiply `x` by `by`"
    return x*by

class Meter:
    "Counts things"
    def __init__(self, start:int=0):
        self.n = start
    def add(self, k:int=1, # how many
           ):
        "Add `k` to the count"
        self.n += k
    def undocumented(self): pass
    @property
    def doubled(self):
        "Twice the count"
        return 2*self.n

def _private(): pass
'''


def code(src, outputs=()): return {'cell_type': 'code', 'metadata': {}, 'outputs': list(outputs), 'source': src, 'execution_count': None}
def md(src): return {'cell_type': 'markdown', 'metadata': {}, 'source': src}
def stream(text): return {'output_type': 'stream', 'name': 'stdout', 'text': text}
def write_nb(path, cells):
    path.write_text(json.dumps({'cells': cells, 'metadata': {'kernelspec': {'language': 'python', 'name': 'python3'}},
                                'nbformat': 4, 'nbformat_minor': 5}))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    "nbs/ with a landing notebook and a module's notebook (module `docsdemo`, importable), pages/ with one page"
    (tmp_path/'docsdemo.py').write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'docsdemo', raising=False)  # each test imports its own
    nbs, pages = tmp_path/'nbs', tmp_path/'pages'
    nbs.mkdir(); pages.mkdir()
    write_nb(nbs/'index.ipynb', [md('# demo_lib\n> The landing page'), md('See `scale` and [the guide](10_guide.md).')])
    write_nb(nbs/'01_demo.ipynb', [
        md('# Demo\n> A module to test the build'),
        code('#| default_exp docsdemo'),
        code('#| hide\nimport secret_setup'),
        code('#| export\n' + MODULE),
        md('Use `scale`, `Meter.add` and `nowhere`; the [landing page](index.ipynb#demo_lib).'),
        code("print('epoch train_loss')", [stream('\repoch     train_loss\n\r\r0         0.5\n')]),  # fastprogress's \r
        code('plot()', [{'output_type': 'display_data', 'metadata': {}, 'data': {'image/png': PNG, 'text/plain': '<Figure>'}}]),
        code('1 < 2', [{'output_type': 'execute_result', 'metadata': {}, 'execution_count': 1, 'data': {'text/plain': 'True'}}]),
    ])
    (pages/'10_guide.md').write_text('# Guide\n\nThe [demo](../nbs/01_demo.ipynb) documents `scale`.\n')
    (pages/'img').mkdir()
    (pages/'img'/'dot.png').write_bytes(base64.b64decode(PNG))
    return tmp_path


def test_page_names():
    "nbdev's rule: the numeric prefix dropped, lower case"
    assert [page_name(p) for p in ('nbs/12_cds.ipynb', '11a_compile.ipynb', 'index.ipynb', '10_Reference.md')] == \
        ['cds', 'compile', 'index', 'reference']


def test_output_bytes():
    "Each output as compact JSON in UTF-8 (the `é` is 2 bytes), source and metadata not counted"
    nb = {'cells': [code('x' * 500, [stream('é\n')]), md('# t'), code('y', [])]}
    assert output_bytes(nb) == len('{"output_type":"stream","name":"stdout","text":"é\\n"}') + 1


def test_outputs_checked(tmp_path):
    "A notebook over the budget and one with a saved error are both named; a small one is not"
    big = write_nb(tmp_path/'big.ipynb', [code('x', [stream('z' * 1000)])])
    err = write_nb(tmp_path/'err.ipynb', [code('1/0', [{'output_type': 'error', 'ename': 'ZeroDivisionError',
                                                        'evalue': 'division by zero', 'traceback': []}])])
    ok = write_nb(tmp_path/'ok.ipynb', [code('x', [stream('z' * 10)])])
    problems = check_outputs([big, err, ok], budget=1000)
    assert len(problems) == 2
    assert problems[0].startswith('big.ipynb: its saved outputs take 1,050 bytes, over the budget of 1,000')
    assert problems[1].startswith('err.ipynb: cell 0 saved an error (ZeroDivisionError: division by zero)')


def test_notebooks_within_budget():
    "The repository's notebooks: no saved output over the budget, no saved error"
    assert check_outputs(sorted((ROOT/'nbs').glob('*.ipynb'))) == []


def test_budget_stated_in_docs():
    "The docs page states the budget the build enforces"
    text = (ROOT/'docs'/'pages'/'90_docs.md').read_text()
    assert f'**{OUTPUT_BUDGET // 1000} KB** ({OUTPUT_BUDGET:,} bytes' in text


def test_notebook_page(project):
    "Prose, outputs and API entries on the page; hidden and exported source, private and undocumented members left out"
    dest = project/'src'
    nav = generate(project/'nbs', project/'pages', dest, lib=None)
    assert nav == [{'Home': 'index.md'}, {'Guides': [{'Guide': 'guide.md'}]}, {'API': [{'Demo': 'demo.md'}]}]
    page = (dest/'demo.md').read_text()
    assert page.startswith('# Demo\n\nA module to test the build\n{: .nb-description }\n')
    assert 'secret_setup' not in page and 'return x*by' not in page and 'default_exp' not in page
    # the API: signature, docstring, docments (a table only where an argument has one)
    assert '### scale { #scale .api-entry }\n\n```python\nscale(x: float, by: int = 2) -> float\n```\n\nMultiply `x` by `by`' in page
    assert '| `x` | `float` |  | the value |\n| `by` | `int` | `2` | the factor |\n| **returns** | `float` |  | the scaled value |' in page
    assert '### Meter { #meter .api-entry }\n\n```python\nclass Meter(start: int = 0)\n```\n\nCounts things\n\n#### ' in page
    assert '#### Meter.add { #meter.add .api-entry }\n\n```python\nMeter.add(k: int = 1)\n```\n\nAdd `k` to the count' in page
    assert '| `k` | `int` | `1` | how many |' in page
    assert '#### Meter.doubled { #meter.doubled .api-entry }' in page and 'Twice the count' in page
    assert 'undocumented' not in page and '_private' not in page
    # links: names to their entries, notebooks and pages to their pages; unknown names left alone
    assert 'Use [`scale`](demo.md#scale), [`Meter.add`](demo.md#meter.add) and `nowhere`; the [landing page](index.md#demo_lib).' in page
    assert 'The [demo](demo.md) documents [`scale`](demo.md#scale).' in (dest/'guide.md').read_text()
    assert 'See [`scale`](demo.md#scale) and [the guide](guide.md).' in (dest/'index.md').read_text()
    # saved outputs: printed text, the image as a file, a result
    assert '<pre class="nb-output nb-stream">epoch     train_loss\n0         0.5</pre>' in page
    imgs = re.findall(r'!\[[^\]]*\]\((img/[^)]+)\)\{ \.nb-output \.nb-plot \}', page)
    assert imgs == ['img/demo-6-0.png'] and (dest/imgs[0]).read_bytes() == base64.b64decode(PNG)
    assert '<pre class="nb-output nb-result">True</pre>' in page
    assert (dest/'img'/'dot.png').read_bytes() == base64.b64decode(PNG)  # the pages' own files, copied


def test_problems_fail_the_build(project):
    "A public name without a docstring, a saved error and a notebook without a title: all listed in one error"
    nb = project/'nbs'/'01_demo.ipynb'
    d = json.loads(nb.read_text())
    d['cells'].insert(4, code('#| export\ndef nodoc(a): return a'))
    d['cells'][6]['outputs'].append({'output_type': 'error', 'ename': 'ValueError', 'evalue': 'bad', 'traceback': []})
    nb.write_text(json.dumps(d))
    (project/'docsdemo.py').write_text(MODULE + '\ndef nodoc(a): return a\n')
    write_nb(project/'nbs'/'02_untitled.ipynb', [md('No title here.')])
    with pytest.raises(DocsError) as e:
        generate(project/'nbs', project/'pages', project/'src', lib=None)
    msg = str(e.value)
    assert '01_demo.ipynb: `docsdemo.nodoc` has no docstring' in msg, msg
    assert '01_demo.ipynb: cell 6 saved an error (ValueError: bad)' in msg
    assert '02_untitled.ipynb: no title' in msg
    assert msg.count('\n  ') == 3


def test_site_links_checked(project):
    "mkdocs in strict mode: the site builds with its pages' ids; a broken link and a missing anchor fail it, named"
    site = build(project/'nbs', project/'pages', project/'out', lib=None)
    demo = (site/'demo.html').read_text()
    assert 'id="scale"' in demo and 'id="meter.add"' in demo and 'href="demo.html#meter.add"' in demo
    assert (site/'img'/'demo-6-0.png').read_bytes() == base64.b64decode(PNG)
    (project/'pages'/'10_guide.md').write_text('# Guide\n\n[gone](missing.md) and [no anchor](demo.md#nowhere)\n')
    with pytest.raises(DocsError) as e:
        build(project/'nbs', project/'pages', project/'out', lib=None)
    assert "'missing.md'" in str(e.value) and "'#nowhere'" in str(e.value)


@pytest.mark.slow
def test_site_in_browser():
    """The real site: built, then its landing and CDSCallback pages opened in headless Chromium (`docs.browser`): the
    CDSCallback page shows its API entry, a progress table and a plot; screenshots in _build/screenshots/"""
    from docs.browser import check_site
    site = build()
    shots = ROOT/'_build'/'screenshots'
    assert check_site(site, shots) == []
    for f in ('index.png', 'cds.png'): assert (shots/f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
