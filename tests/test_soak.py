"""The soak test, `bench/soak.py`: CDS training with the semi-supervised and distillation paths on, checked step by step
for leaks (resident memory, hooks, tensors of earlier batches, live tensors). Here a short run passes its checks and a run
with planted leaks fails them; `-m slow` runs the full 2,000 steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOAK = ROOT / 'bench' / 'soak.py'
# this checkout's fastai_cds, whatever is installed; one intra-op thread (a shared 2-core machine)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}


def soak(*runs, timeout=1800):
    "Run `bench/soak.py` with each list of arguments, all at once; (return code, the JSON line of figures) of each"
    procs = [subprocess.Popen([sys.executable, str(SOAK), *map(str, args)], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in runs]
    res = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        lines = [l for l in out.splitlines() if l.startswith('{')]
        assert lines, f"no figures (return code {p.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
        res.append((p.returncode, json.loads(lines[-1])))
    return res


@pytest.mark.slow  # CI's time: 20 s
def test_a_short_soak_passes_and_planted_leaks_fail():
    # 30 steps: across the end of the first epoch (22 steps), where the stage hooks are removed and registered again
    (_, ok), (rc_leak, leak) = soak(['--steps', 30, '--warmup', 10, '--bs', 16, '--label-fraction', 0.25],
                                    ['--steps', 12, '--warmup', 4, '--bs', 16, '--leak'])
    assert ok['steps'] == 30 and ok['epochs'] == 2 and len(ok['hook_counts']) == 1 and ok['hook_counts'][0] > 0  # the stage hooks, while training
    assert ok['old_batch_tensors_alive'] == [] and ok['last_batch_tensors_alive_after_fit'] == []
    assert ok['live_tensors_outside_logs'][1] - ok['live_tensors_outside_logs'][0] < 20 / 4
    assert all(v for k, v in ok['checks'].items() if not k.startswith('resident memory')), ok['checks']  # memory: the slow run
    # a callback that keeps every batch and adds a hook every step: the checks see it
    assert rc_leak == 1
    assert leak['hook_counts'] == list(range(leak['hook_counts'][0], leak['hook_counts'][0] + 9))  # one more hook each step
    assert 'xb' in leak['old_batch_tensors_alive'] and 'xb' in leak['last_batch_tensors_alive_after_fit']
    failed = {k for k, v in leak['checks'].items() if not v}
    assert {'the same number of hooks at every step', 'no tensor of a batch alive one step later',
            'no tensor of the last batch alive after the fit', 'live tensors outside the per-batch logs: no growth per step'} <= failed


@pytest.mark.slow
def test_soak_2000_steps():
    ((rc, res),) = soak(['--steps', 2000, '--warmup', 200])
    assert res['rss_peak_growth_pct'] < 2 and len(res['hook_counts']) == 1 and res['old_batch_tensors_alive'] == []
    assert rc == 0 and all(res['checks'].values()), res['checks']
