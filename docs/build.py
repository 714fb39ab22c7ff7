"""Build the documentation site offline, from the notebooks: `python -m docs` (run from the repository root).

* Every notebook of `nbs/` becomes a page: its prose, its code, the outputs saved in it (progress tables, plots), and the
  API of what it exports: each public function or class of an `#| export` cell gets a heading, its signature, its
  docstring and a table of its arguments with their docments (fastcore's `arg:int=1, # what it does` comments); a class
  also lists its own public methods and properties that have a docstring. `nbs/index.ipynb` is the landing page.
* Every file under `docs/pages/` (markdown pages, their images) is copied as it is; a numeric prefix of a name orders the
  pages and is dropped from the page's name (`10_reference.md` -> `reference.html`), as nbdev does for notebooks.
* mkdocs (Material theme) renders everything into `_build/site/` (open `_build/site/index.html`; no server needed).

Notebooks are not executed: the pages show the outputs saved in the notebooks (`nbdev-test` runs them in CI). The build
fails, listing every problem, on: a saved error output, a notebook whose saved outputs exceed `OUTPUT_BUDGET`, an API
entry without a docstring, a notebook without a `# title` cell, and (mkdocs in strict mode) a broken internal link, a
link to a missing anchor, or a page missing from the navigation."""
from __future__ import annotations
import argparse, ast, base64, enum, html, importlib, inspect, json, os, re, shutil, subprocess, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT/'docs'                 # this tooling, the site's config (mkdocs.yml) and the hand-written pages
PAGES = DOCS/'pages'               # hand-written pages: markdown files and their images
NBS = ROOT/'nbs'
BUILD = ROOT/'_build'              # ignored by git: the generated pages (docs_src/), the site (site/), screenshots
LIB = 'fastai_cds'
OUTPUT_BUDGET = 64_000             # bytes: the saved outputs of one notebook, as JSON (base64 images included)

__all__ = ['OUTPUT_BUDGET', 'DocsError', 'page_name', 'output_bytes', 'check_outputs', 'api_entries', 'notebook_page',
           'Linker', 'generate', 'build', 'main']


class DocsError(Exception):
    "The docs cannot be built: the message lists every problem found"


def page_name(path) -> str:
    "Page name of a notebook or hand-written page: the file's stem, lower case, without its numeric prefix (nbdev's rule)"
    return re.sub(r'^\d+[a-zA-Z0-9]*_', '', Path(path).stem.lower())


def _nb_json(path) -> dict: return json.loads(Path(path).read_text(encoding='utf-8'))

def output_bytes(nb:dict) -> int:
    "Bytes of the outputs saved in notebook `nb` (a dict of its JSON): each output as compact JSON, in UTF-8"
    return sum(len(json.dumps(o, separators=(',', ':'), ensure_ascii=False).encode())
               for c in nb['cells'] for o in c.get('outputs', []))


def check_outputs(paths, budget:int=OUTPUT_BUDGET) -> list[str]:
    "Problems with the outputs saved in the notebooks `paths`: over `budget` bytes, or an error output"
    problems = []
    for p in map(Path, paths):
        nb = _nb_json(p)
        if (n := output_bytes(nb)) > budget:
            problems.append(f"{p.name}: its saved outputs take {n:,} bytes, over the budget of {budget:,} per notebook "
                            "(smaller figures, fewer printed lines, or `#| output: false` on a cell)")
        for i, c in enumerate(nb['cells']):
            for o in c.get('outputs', []):
                if o.get('output_type') == 'error':
                    problems.append(f"{p.name}: cell {i} saved an error ({o.get('ename')}: {o.get('evalue')}); "
                                    "run the notebook again and save it")
    return problems


# ---------------------------------------------------------------------------------------------------------------- API
class _Raw:
    "Shown as its text by `inspect.Signature`'s formatting"
    def __init__(self, s): self.s = s
    def __repr__(self): return self.s

def _anno(a) -> str:
    if a is inspect.Parameter.empty: return ''
    if isinstance(a, str): return a
    return a.__name__ if isinstance(a, type) else str(a).replace('typing.', '')

def _default(d) -> str:
    if d is inspect.Parameter.empty: return ''
    if isinstance(d, enum.Enum): return f'{type(d).__name__}.{d.name}'
    r = repr(d)
    if ' at 0x' in r or len(r) > 60: r = getattr(d, '__qualname__', None) or getattr(d, '__name__', None) or type(d).__name__
    return r

def _params(ps:list) -> list[str]:
    "Each parameter as `str(Signature)` writes it (`x: int = 1`), with its `/` and `*` markers"
    res = []
    for i, p in enumerate(ps):
        if p.kind == p.KEYWORD_ONLY and not any(q.kind in (p.VAR_POSITIONAL, p.KEYWORD_ONLY) for q in ps[:i]): res.append('*')
        res.append(str(p))
        if p.kind == p.POSITIONAL_ONLY and (i + 1 == len(ps) or ps[i+1].kind != p.POSITIONAL_ONLY): res.append('/')
    return res

def _signature(name:str, o, method:bool=False) -> str:
    "`name(arg: type = default, ...)`, one argument a line when long; a `method`'s first argument (self, cls) left out"
    try: sig = inspect.signature(o)
    except (TypeError, ValueError): return f'{name}(...)'
    ps = list(sig.parameters.values())[1 if method else 0:]
    ps = [p.replace(annotation=_Raw(_anno(p.annotation)) if p.annotation is not p.empty else p.empty,
                    default=_Raw(_default(p.default)) if p.default is not p.empty else p.empty) for p in ps]
    ret = f' -> {_anno(sig.return_annotation)}' if sig.return_annotation is not sig.empty else ''
    items = _params(ps)
    one = f"{name}({', '.join(items)}){ret}"
    return one if len(one) <= 100 else name + '(\n' + ''.join(f'    {i},\n' for i in items) + ')' + ret

def _own_doc(o) -> str:
    "The docstring written on `o` itself (a class does not inherit its base's)"
    d = o.__dict__.get('__doc__') if inspect.isclass(o) else getattr(o, '__doc__', None)
    return inspect.cleandoc(d) if isinstance(d, str) else ''

def _md_cell(s) -> str:
    "`s` as one cell of a markdown table: on one line, its `|` escaped outside code spans (inside them they are literal)"
    parts = re.split(r'(`[^`]*`)', str(s).replace('\n', ' '))
    return ''.join(p if p.startswith('`') else p.replace('|', '\\|') for p in parts)

def _arg_table(o) -> str:
    "A table of the arguments of `o` (type, default, docment), if any argument or the return value has a docment"
    from fastcore.docments import docments
    try: dm = docments(o, full=True)
    except Exception: return ''
    if not any(v.docment for k, v in dm.items() if k not in ('self', 'cls')): return ''
    rows = []
    for k, v in dm.items():
        if k in ('self', 'cls'): continue
        if k == 'return':
            if not v.docment: continue
            name = '**returns**'
        else:
            star = {inspect.Parameter.VAR_POSITIONAL: '*', inspect.Parameter.VAR_KEYWORD: '**'}.get(v.get('kind'), '')
            name = f'`{star}{k}`'
        anno, default = _anno(v.anno), _default(v.default)
        rows.append(f"| {name} | {_md_cell(f'`{anno}`') if anno else ''} | {_md_cell(f'`{default}`') if default else ''} "
                    f"| {_md_cell(v.docment or '')} |")
    if not rows: return ''
    return '| argument | type | default | details |\n|---|---|---|---|\n' + '\n'.join(rows)

def _anchor(name:str) -> str: return name.lower()

def _members(cls) -> list:
    "Public methods and properties defined on `cls` itself that have a docstring, in definition order: (name, object, method)"
    res = []
    for k, v in cls.__dict__.items():
        if k.startswith('_'): continue
        f = v.__func__ if isinstance(v, (classmethod, staticmethod)) else v
        if (isinstance(f, property) or inspect.isfunction(f)) and _own_doc(f): res.append((k, f, not isinstance(v, staticmethod)))
    return res

def _entry(name:str, o, level:int=3, method:bool=False) -> str:
    "The markdown of the API entry of `o`: a heading (anchor: `name` in lower case), signature, docstring, argument table"
    doc = _own_doc(o)
    kind = 'property' if isinstance(o, property) else 'class' if inspect.isclass(o) else ''
    lines = [f"{'#'*level} {name} {{ #{_anchor(name)} .api-entry }}", '']
    if isinstance(o, property): lines += [f'```python\n{name}  # property\n```', '']
    else: lines += [f"```python\n{'class ' if kind == 'class' else ''}{_signature(name, o, method)}\n```", '']
    if doc: lines += [doc, '']
    if not isinstance(o, property) and (t := _arg_table(o)): lines += [t, '']
    return '\n'.join(lines).rstrip('\n')

def _def_names(source:str) -> list[str]:
    "Public functions and classes defined at the top of a cell (nbdev's rule: `@patch`ed methods as `Class.method`)"
    from nbdev.showdoc import showdoc_nm
    try: tree = ast.parse(source)
    except SyntaxError: return []
    names = []
    for t in tree.body:
        if isinstance(t, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (not t.name.startswith('_') or t.name.startswith('__')):
            nm = showdoc_nm(t)
            names += nm if isinstance(nm, list) else [nm]
    return names

def _resolve(module, name:str):
    o = module
    for part in name.split('.'): o = getattr(o, part)
    return o

def api_entries(module_name:str, source:str) -> list[tuple[str, object, list]]:
    "The entries documented for an export cell of `source` into `module_name`: `(name, object, [(member, object, method)])`"
    try: mod = importlib.import_module(module_name)
    except ImportError as e: raise DocsError(f'cannot import `{module_name}` ({e})') from e
    res = []
    for nm in _def_names(source):
        try: o = _resolve(mod, nm)
        except AttributeError: raise DocsError(f'`{module_name}` has no `{nm}`: run nbdev-export') from None
        res.append((nm, o, [(f'{nm}.{k}', m, meth) for k, m, meth in _members(o)] if inspect.isclass(o) else []))
    return res


# -------------------------------------------------------------------------------------------------------------- links
_re_code = re.compile(r'(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)')   # a code span: a run of backticks closed by the same run
_re_name = re.compile(r'([^`\s]+?)(\(\))?')                        # `name` or `name()`
_re_mdlink = re.compile(r'(\]\()([^)\s#]+)(#[^)\s]*)?(\))')           # ](target#anchor)

class Linker:
    "Turns `name` into a link to its API entry, and links to a notebook or page file into links to its page"
    def __init__(self, entries:dict[str, str]|None=None, files:dict[str, str]|None=None):
        self.entries = entries or {}  # name -> 'page.md#anchor'
        self.files = files or {}      # source file name ('12_cds.ipynb', '10_reference.md') -> 'cds.md'

    def add(self, name:str, module:str, page:str):
        "Register the entry `name` of `module`, documented on `page`, under its short and dotted names"
        target = f'{page}.md#{_anchor(name)}'
        for k in (name, f'{module}.{name}', f"{module.rsplit('.', 1)[-1]}.{name}"): self.entries.setdefault(k, target)

    def _file(self, m):
        t = self.files.get(Path(m.group(2)).name) if '://' not in m.group(2) else None
        return m.group(0) if t is None else f'{m.group(1)}{t}{m.group(3) or ""}{m.group(4)}'

    def _line(self, l:str) -> str:
        out, pos = [], 0
        for m in _re_code.finditer(l):
            out.append(_re_mdlink.sub(self._file, l[pos:m.start()]))
            code, nm = m.group(0), _re_name.fullmatch(m.group(2))
            if m.group(1) == '`' and nm and not l[:m.start()].endswith('[') and not l[m.end():].startswith(']('):
                if (t := self.entries.get(nm.group(1))): code = f'[{code}]({t})'
            out.append(code)
            pos = m.end()
        return ''.join(out) + _re_mdlink.sub(self._file, l[pos:])

    def __call__(self, md:str) -> str:
        "`md` with its names and page files linked, except in code blocks"
        out, fence = [], False
        for l in md.split('\n'):
            if l.lstrip().startswith(('```', '~~~')): fence = not fence
            elif not fence and not l.startswith('    '): l = self._line(l)
            out.append(l)
        return '\n'.join(out)


# ---------------------------------------------------------------------------------------------------------- notebooks
_hidden = {'hide', 'export', 'exporti', 'default_exp'}   # cells whose source the page leaves out
_documented = {'export', 'exports'}                      # cells whose definitions the page documents

def _text(x) -> str: return ''.join(x) if isinstance(x, list) else x

def _carriage_returns(text:str) -> str:
    "Each line as a terminal shows it: what follows its last carriage return (fastprogress redraws its lines with `\\r`)"
    return '\n'.join(next((p for p in reversed(l.split('\r')) if p), '') for l in text.split('\n'))

def _pre(text:str, cls:str) -> str: return f'<pre class="nb-output {cls}">{html.escape(_carriage_returns(text).rstrip())}</pre>'

def _outputs(cell, page:str, idx:int, img_dir:Path, link) -> list[str]:
    res = []
    for k, o in enumerate(cell.get('outputs', [])):
        ot = o.get('output_type')
        if ot == 'stream':
            if (t := _text(o.get('text', ''))).strip(): res.append(_pre(t, 'nb-stream' if o.get('name') != 'stderr' else 'nb-stderr'))
        elif ot in ('display_data', 'execute_result'):
            d = o.get('data', {})
            img = next((m for m in ('image/png', 'image/jpeg', 'image/svg+xml') if m in d), None)
            if img:
                fn = f"{page}-{idx}-{k}.{ {'image/png': 'png', 'image/jpeg': 'jpg', 'image/svg+xml': 'svg'}[img] }"
                img_dir.mkdir(parents=True, exist_ok=True)
                if img == 'image/svg+xml': (img_dir/fn).write_text(_text(d[img]), encoding='utf-8')
                else: (img_dir/fn).write_bytes(base64.b64decode(_text(d[img])))
                res.append(f'![output of cell {idx}](img/{fn}){{ .nb-output .nb-plot }}')
            elif 'text/html' in d: res.append(f'<div class="nb-output nb-html">\n{_text(d["text/html"]).strip()}\n</div>')
            elif 'text/markdown' in d: res.append(link(_text(d['text/markdown'])))
            elif 'text/plain' in d: res.append(_pre(_text(d['text/plain']), 'nb-result'))
    return res


_re_magics = re.compile(r"^\s*(%load_ext|%autoreload|%reload_ext|%matplotlib|%config)\b.*", re.M)

def _clean_magics(cell):
    "Remove housekeeping magics (nbdev's default `strip_magics`; its own processor reads the config at every cell)"
    if cell.cell_type == 'code' and cell.source: cell.source = _re_magics.sub('', cell.source).strip()

_cache = {}

def _processed(path:Path):
    "The cells of notebook `path` through nbdev's processors (directives read and removed, frontmatter taken); cached"
    from fastcore.nbio import read_nb
    from nbdev.process import NBProcessor
    from nbdev.processors import hide_line, filter_stream_, rm_header_dash, strip_ansi
    from nbdev.frontmatter import FrontmatterProc
    path = Path(path).resolve()
    key = (path, path.stat().st_mtime_ns)
    if key not in _cache:
        nb = read_nb(path)
        NBProcessor(nb=nb, procs=[FrontmatterProc, strip_ansi, hide_line, filter_stream_, rm_header_dash, _clean_magics]).process()
        _cache[key] = nb, {k: v for k, v in getattr(nb, 'frontmatter_', {}).items() if k != 'output-file'}
    return _cache[key]


def _default_exp(nb) -> str|None:
    return next((c.directives_['default_exp'] for c in nb.cells if c.cell_type == 'code' and 'default_exp' in c.directives_), None)


def _module(directives:dict, default_exp:str|None, lib:str|None) -> str:
    "The module an export cell writes to: the one its directive names, or the notebook's `default_exp`, in package `lib`"
    name = directives.get('export') or directives.get('exports') or default_exp
    return f'{lib}.{name}' if lib else name


def notebook_page(path, link:Linker, img_dir:Path, lib:str|None=LIB, problems:list|None=None) -> str:
    "The markdown page of notebook `path`; its images are written to `img_dir`; problems found are added to `problems`"
    path, problems = Path(path), ([] if problems is None else problems)
    nb, fm = _processed(path)
    page, exp = page_name(path), _default_exp(nb)
    title = fm.get('title')
    if not title: problems.append(f"{path.name}: no title (a first markdown cell `# Title` with an optional `> summary` line)")
    out = [f'# {title or page}', '']
    if fm.get('description'): out += [link(fm['description']) + '\n{: .nb-description }', '']
    for i, c in enumerate(nb.cells):
        src, d = (c.get('source') or '').strip(), getattr(c, 'directives_', {}) or {}
        if c.cell_type == 'markdown':
            if src: out += [link(src), '']
            continue
        if c.cell_type != 'code' or 'hide' in d or d.get('include') == 'false': continue
        if src and not (d.keys() & _hidden) and d.get('echo') != 'false': out += [f'```python\n{src}\n```', '']
        if d.get('output') != 'false' and not (d.keys() & {'export', 'exporti', 'default_exp'}):
            for o in _outputs(c, page, i, img_dir, link): out += [o, '']
        if d.keys() & _documented and src:
            mod_name = _module(d, exp, lib)
            try: entries = api_entries(mod_name, src)
            except DocsError as e:
                problems.append(f'{path.name}: {e}')
                continue
            for nm, o, members in entries:
                if not _own_doc(o): problems.append(f"{path.name}: `{mod_name}.{nm}` has no docstring")
                out += [link(_entry(nm, o)), '']
                for m, mo, meth in members: out += [link(_entry(m, mo, 4, meth)), '']
    return '\n'.join(out).rstrip() + '\n'


def _index_entries(paths, link:Linker, lib:str|None):
    "Register every API entry of the notebooks `paths` with `link` (before any page is written, so pages link across)"
    for path in paths:
        nb, _ = _processed(path)
        exp = _default_exp(nb)
        for c in nb.cells:
            d = getattr(c, 'directives_', {}) or {}
            if c.cell_type != 'code' or 'hide' in d or not (d.keys() & _documented): continue
            mod_name = _module(d, exp, lib)
            try: entries = api_entries(mod_name, c.source)
            except DocsError: continue  # told by `notebook_page`
            for nm, o, members in entries:
                link.add(nm, mod_name, page_name(path))
                for m, *_ in members: link.add(m, mod_name, page_name(path))


# --------------------------------------------------------------------------------------------------------------- site
def _md_title(text:str, default:str) -> str:
    m = re.search(r'^#\s+(.+?)\s*$', text, flags=re.M)
    return m.group(1) if m else default

def generate(nbs=NBS, pages=PAGES, dest=BUILD/'docs_src', lib:str|None=LIB, budget:int=OUTPUT_BUDGET) -> list:
    """Write the site's markdown sources into `dest` from the notebooks of `nbs` and the pages of `pages`; return the
    navigation (for mkdocs.yml). Raise `DocsError` listing every problem."""
    nbs, pages, dest = Path(nbs), Path(pages), Path(dest)
    if dest.exists(): shutil.rmtree(dest)
    dest.mkdir(parents=True)
    nb_paths = sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    page_files = sorted(p for p in pages.rglob('*') if p.is_file() and not any(s.startswith(('_', '.')) for s in p.relative_to(pages).parts)) if pages.exists() else []
    md_pages = [p for p in page_files if p.suffix == '.md' and p.parent == pages]
    files, problems = {}, check_outputs(nb_paths, budget)
    for p in nb_paths + md_pages:
        if (nm := page_name(p) + '.md') in files.values():
            problems.append(f"{p.name}: its page name `{nm}` is already taken by {[k for k, v in files.items() if v == nm][0]}")
        files[p.name] = nm
    if 'index.md' not in files.values(): problems.append(f'no landing page: {nbs}/index.ipynb is missing')
    link = Linker(files=files)
    _index_entries(nb_paths, link, lib)
    nav_api, nav_pages = [], []
    for p in nb_paths:
        md = notebook_page(p, link, dest/'img', lib, problems)
        (dest/files[p.name]).write_text(md, encoding='utf-8')
        if files[p.name] != 'index.md': nav_api.append({_md_title(md, page_name(p)): files[p.name]})
    for p in page_files:
        rel = p.relative_to(pages)
        if p in md_pages:
            md = link(p.read_text(encoding='utf-8'))
            (dest/files[p.name]).write_text(md, encoding='utf-8')
            nav_pages.append({_md_title(md, page_name(p)): files[p.name]})
        else:
            (dest/rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest/rel)
    if problems: raise DocsError('the docs cannot be built:\n  ' + '\n  '.join(problems))
    return [{'Home': 'index.md'}] + ([{'Guides': nav_pages}] if nav_pages else []) + ([{'API': nav_api}] if nav_api else [])


def build(nbs=NBS, pages=PAGES, out=BUILD, lib:str|None=LIB, budget:int=OUTPUT_BUDGET, config=DOCS/'mkdocs.yml') -> Path:
    "Generate the pages into `out`/docs_src and render the site into `out`/site with mkdocs (strict); return the site"
    import yaml
    out = Path(out).resolve()
    nav = generate(nbs, pages, out/'docs_src', lib, budget)
    own = yaml.safe_load(Path(config).read_text(encoding='utf-8')) or {}
    cfg = {'INHERIT': str(Path(config).resolve()), 'docs_dir': str(out/'docs_src'), 'site_dir': str(out/'site')}
    if 'nav' not in own: cfg['nav'] = nav   # mkdocs.yml may set its own order; strict mode then fails on a page left out
    (out/'mkdocs.yml').write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding='utf-8')
    # NO_MKDOCS_2_WARNING: Material's banner (its end of life in May 2027, with MkDocs 1) printed at every build
    r = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--clean', '-f', str(out/'mkdocs.yml')],
                       capture_output=True, text=True, env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    log = '\n'.join(l for l in (r.stdout + r.stderr).splitlines() if l.strip())
    if r.returncode: raise DocsError(f'mkdocs build --strict failed:\n{log}')
    return out/'site'


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m docs', description=__doc__.split('\n\n')[0])
    ap.add_argument('--nbs', default=str(NBS), help='folder of the notebooks')
    ap.add_argument('--pages', default=str(PAGES), help='folder of the hand-written pages')
    ap.add_argument('--out', default=str(BUILD), help='build folder: the site goes to OUT/site')
    ap.add_argument('--check', action='store_true', help="only check the notebooks' saved outputs (budget, errors)")
    a = ap.parse_args(argv)
    warnings.filterwarnings('ignore', category=FutureWarning, module='torch')  # torch.jit.script, used by fastai at import
    t0 = time.perf_counter()
    try:
        if a.check:
            nbs = sorted(Path(a.nbs).glob('*.ipynb'))
            if problems := check_outputs(nbs): raise DocsError('\n  '.join(['saved outputs:', *problems]))
            print(f'{len(nbs)} notebooks, saved outputs within {OUTPUT_BUDGET:,} bytes each, no error saved')
            return 0
        site = build(a.nbs, a.pages, a.out)
    except DocsError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'site built in {time.perf_counter() - t0:.1f} s: {site/"index.html"}')
    return 0
