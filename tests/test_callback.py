"""Tests of the package's edges: `fastai_cds.all` is one documented API, importing fastai_cds changes nothing for a plain
Learner, and `ScopedCallback` scopes the export and load of fastai_cds to the Learners carrying its callbacks."""
import importlib
import inspect
import json
import pkgutil
import textwrap

import fastai_cds
import fastai_cds.all as api
from fastai_cds.callback import ScopedCallback

from helpers import run_children


def _modules():
    return [importlib.import_module(f'fastai_cds.{m.name}') for m in pkgutil.iter_modules(fastai_cds.__path__)
            if m.name not in ('all', '_modidx')]


def test_all_binds_each_name_to_one_object_of_the_package():
    "Every name of `fastai_cds.all` is the object every module of the package gives that name (no `LAYOUTS` twice)"
    ns = {}
    exec('from fastai_cds.all import *', ns)
    names = [n for n in ns if n != '__builtins__']
    assert sorted(names) == sorted(api.__all__) and len(names) > 50
    for mod in _modules():
        for n in getattr(mod, '__all__', []):
            if n in ns: assert getattr(mod, n) is ns[n], f"{n}: fastai_cds.{mod.__name__} has another object of that name"


def test_all_holds_only_documented_names_of_the_package():
    for n in api.__all__:
        o = getattr(api, n)
        assert (getattr(o, '__module__', '') or '').startswith('fastai_cds.'), n  # ours, not a re-export of fastai's
        doc = o.__doc__ if inspect.isfunction(o) else vars(o).get('__doc__') if inspect.isclass(o) else None
        assert doc and doc.strip(), f"{n} has no docstring of its own"
    internals = {'world', 'instance_ids', 'conv_trunk', 'whole_set', 'url_of', 'print_table', 'report', 'smoke_folder', 'LAYOUTS'}
    assert not internals & set(api.__all__)


def test_every_callback_of_the_package_is_scoped():
    "A callback of fastai_cds that did not derive from `ScopedCallback` would put itself into a plain export"
    from fastai.callback.core import Callback
    cbs = {o for mod in _modules() for o in vars(mod).values()
           if inspect.isclass(o) and issubclass(o, Callback) and o.__module__.startswith('fastai_cds.')}
    assert len(cbs) >= 12 and all(issubclass(c, ScopedCallback) for c in cbs), [c for c in cbs if not issubclass(c, ScopedCallback)]


PLAIN = textwrap.dedent("""
    import io, json, sys, warnings, contextlib
    warnings.filterwarnings('ignore')
    import torch; torch.set_num_threads(1)
    from fastai.vision.all import *
    snap = lambda: {c.__qualname__: dict(vars(c)) for c in (Learner, DataLoaders, TfmdDL, Callback, Recorder, Optimizer)}
    before = snap()
    if sys.argv[2] == 'with': import fastai_cds.all
    after = snap()
    set_seed(0)
    items = [(torch.rand(8, 8).mul(255).byte().numpy(), i % 3) for i in range(24)]
    dls = DataBlock((ImageBlock(cls=PILImageBW), CategoryBlock), getters=[ItemGetter(0), ItemGetter(1)],
                    splitter=IndexSplitter(range(16, 24))).dataloaders(items, bs=8, num_workers=0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), path=sys.argv[1], metrics=accuracy)
    with learn.no_bar(): learn.fit(1, 1e-2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        learn.save('plain')
        learn.load('plain')
        learn.export('plain.pkl')
    back = load_learner(f'{sys.argv[1]}/plain.pkl')
    json.dump(dict(same_classes=all(before[k][a] is after[k][a] for k in before for a in before[k]) and before.keys() == after.keys()
                   and all(before[k].keys() == after[k].keys() for k in before),
                   printed=out.getvalue(),
                   cbs=sorted(type(cb).__name__ for cb in back.cbs), model=list(back.model.state_dict())),
              open(f'{sys.argv[1]}/{sys.argv[2]}.json', 'w'))
""")


def test_importing_fastai_cds_changes_nothing_for_a_plain_learner(tmp_path):
    """After `import fastai_cds.all`, fastai's classes are the same objects, attribute by attribute, and a plain Learner
    fits, saves, loads and exports as it does without fastai_cds, printing nothing more"""
    (tmp_path / 'a').mkdir(); (tmp_path / 'b').mkdir()
    run_children((PLAIN, tmp_path / 'a', 'without'), (PLAIN, tmp_path / 'b', 'with'))
    without, with_ = json.load(open(tmp_path / 'a/without.json')), json.load(open(tmp_path / 'b/with.json'))
    assert with_['same_classes'] and without['same_classes']
    assert with_ == without
    assert with_['printed'] == ''
    from helpers import pickled_globals
    assert pickled_globals(tmp_path / 'a/plain.pkl') == pickled_globals(tmp_path / 'b/plain.pkl')
