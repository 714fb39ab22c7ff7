"""Optional dependencies: a missing one is a message naming the extra to install, not a bare import error."""
import textwrap

from helpers import run_children

NO_ACCELERATE = textwrap.dedent("""
    import os, sys, json, warnings
    sys.modules['accelerate'] = None  # not installed
    warnings.filterwarnings('ignore')
    from fastai_cds.all import init_distributed
    os.environ.update(WORLD_SIZE='2', RANK='0', LOCAL_RANK='0')
    try: init_distributed(); print('no error')
    except ModuleNotFoundError as e: print(json.dumps([type(e).__name__, str(e)]))
""")


def test_distributed_without_accelerate_names_the_extra():
    (out,) = run_children((NO_ACCELERATE,))
    assert out.strip() == ('["ModuleNotFoundError", "Training on several processes uses fastai.distributed, which needs accelerate: '
                           'pip install \'fastai_cds[distributed]\' (or: pip install accelerate)"]')
