"""The benchmarks: what they share (`fastai_cds.benchmark`: the resumable runs, the paired statistics, the interleaved
timer), that no script imports another, and bench/gpu.py's whole path on a CPU with tiny models (`--device cpu --tiny`)
with its one-line answer when asked for CUDA on a machine without it. The scripts run as a user would."""
import ast, json, math, re, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch

from fastai_cds.benchmark import RunLog, Paired, delta_cells, interleaved_times, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def script(name, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT/'bench'/name), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)


# ---------------------------------------------------------------- the scripts
def test_no_script_imports_another():
    scripts = {p.stem for p in (ROOT/'bench').glob('*.py')}
    for p in (ROOT/'bench').glob('*.py'):
        tree = ast.parse(p.read_text())
        mods = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert not mods & scripts, f"{p.name} imports {mods & scripts}"


# ---------------------------------------------------------------- resumable runs
class Toy:
    "A benchmark's `run`: records its calls, gives an accuracy from the configuration; fails on `fail_at`"
    def __init__(self, fail_at=None): self.calls, self.threads, self.fail_at = [], [], fail_at
    def __call__(self, method, seed, lr, **_):
        if (method, seed) == self.fail_at: raise KeyboardInterrupt
        self.calls.append((method, seed)); self.threads.append(torch.get_num_threads())
        return dict(acc=0.5 + seed/10 + (lr if method == 'b' else 0), secs=0.)


def configs(seeds, lr=0.01):
    return [dict(method=m, seed=s, lr=lr) for s in seeds for m in ('a', 'b')]


def test_runs_resume_where_they_stopped(tmp_path):
    path, key = tmp_path/'out'/'runs.jsonl', ['method', 'seed', 'lr']
    first = Toy(fail_at=('b', 1))  # interrupted in its fourth run
    with pytest.raises(KeyboardInterrupt): RunLog(path, key).run(configs([0, 1, 2]), first, log=None)
    assert first.calls == [('a', 0), ('b', 0), ('a', 1)]
    assert [(r['method'], r['seed']) for r in map(json.loads, path.read_text().splitlines())] == first.calls  # written as they finished
    again, lines = Toy(), []
    new = RunLog(path, key).run(configs([0, 1, 2]), again, log=lines.append)
    assert again.calls == [('b', 1), ('a', 2), ('b', 2)]  # only what was not done
    assert [(r['method'], r['seed']) for r in new] == again.calls and len(lines) == 3
    assert lines[0].startswith('seed 1 b  acc  61.00%')
    other, n_threads = Toy(), torch.get_num_threads()
    log = RunLog(path, key)
    log.run(configs([0]) + [dict(c, lr=0.02, threads=3) for c in configs([0])], other, threads=2, log=None)  # another setting is another run
    assert other.calls == [('a', 0), ('b', 0)] and other.threads == [3, 3]  # a configuration's own threads
    assert again.threads == [1, 1, 1] and torch.get_num_threads() == n_threads  # the process's threads as they were
    assert len(log.rows) == 8 and len(log.select(configs([0, 1, 2]))) == 6 and len(log.select(configs([0], lr=0.02))) == 2
    rows = log.select(configs([0, 1, 2]))
    assert {(r['method'], r['seed'], r['acc'], r['threads'], r['workers']) for r in rows} == {
        (m, s, 0.5 + s/10 + (0.01 if m == 'b' else 0), 1, 1) for m in 'ab' for s in range(3)}


def test_a_row_without_a_key_field_reads_as_default(tmp_path):
    path = tmp_path/'runs.jsonl'
    path.write_text(json.dumps(dict(method='a', seed=0, acc=0.5)) + '\n\n')  # written before `lr` existed
    log = RunLog(path, ['method', 'seed', 'lr'])
    assert log.key(log.rows[0]) == ('a', 0, 'default')
    assert log.todo([dict(method='a', seed=0, lr='default'), dict(method='a', seed=0, lr=0.1)]) == [dict(method='a', seed=0, lr=0.1)]
    by_method = RunLog(path, lambda r: ['method', 'seed'] + (['lr'] if r['method'] == 'b' else []))  # `a` does not depend on lr
    assert by_method.todo(configs([0])) == [dict(method='b', seed=0, lr=0.01)]


@pytest.mark.slow
def test_runs_in_worker_processes(tmp_path):
    "`dict` as the run: each worker process returns its configuration (picklable by reference, as a script's function is)"
    new = RunLog(tmp_path/'runs.jsonl', ['method', 'seed']).run(configs([0, 1]), dict, workers=2, threads=1, log=None)
    assert sorted((r['method'], r['seed'], r['workers']) for r in new) == [('a', 0, 2), ('a', 1, 2), ('b', 0, 2), ('b', 1, 2)]
    assert len(RunLog(tmp_path/'runs.jsonl', ['method', 'seed']).rows) == 4


# ---------------------------------------------------------------- paired statistics
def test_paired_differences_by_hand():
    # four seeds of a reference `ref` and a method `m` (accuracies), a fifth seed `m` did not finish, another setting apart
    ref, m = [0.90, 0.80, 0.85, 0.70, 0.95], [0.93, 0.80, 0.89, 0.69]
    rows = ([dict(method='ref', seed=s, lf=0.1, acc=a, secs=1.) for s, a in enumerate(ref)] +
            [dict(method='m', seed=s, lf=0.1, acc=a, secs=3.) for s, a in enumerate(m)] +
            [dict(method='m', seed=4, lf=1.0, acc=0., secs=0.)])
    p = Paired(rows, ['ref', 'm'], [0, 1, 2, 3, 4], 'ref', lf=0.1)
    assert p.seeds == [0, 1, 2, 3]
    # differences in points: 3, 0, 4, -1; mean 1.5; squares of the deviations 2.25 + 2.25 + 6.25 + 6.25 = 17, sd = sqrt(17/3);
    # Student's t, 3 degrees of freedom, 97.5 %: 3.182 (a table's value); half-width 3.182 * sd / 2 = 3.787
    hw = 3.182 * math.sqrt(17/3) / 2
    cell, wtl = p.delta('m')
    lo, hi = map(float, re.fullmatch(r'\+1\.50 \[(.*), (.*)\]', cell).groups())
    assert lo == pytest.approx(1.5 - hw, abs=0.011) and hi == pytest.approx(1.5 + hw, abs=0.011)
    assert wtl == '2/1/1' and p.delta('ref') == ('—', '—')
    # mean ± sample std of m in percent: 82.75, sqrt((10.25^2 + 2.75^2 + 6.25^2 + 13.75^2) / 3) = sqrt(340.75/3) = 10.66
    assert p.mean_std('m') == '82.75 ± 10.66' and p.mean('m', 'secs') == 3.
    assert delta_cells(np.array([0.5]), np.array([0.4])) == ('+10.00 [+nan, +nan]', '1/0/0')  # one seed: no interval
    assert markdown_table(['method', 'Δ'], [['m', cell], ['ref', '—']]) == f"| method | Δ |\n|---|---|\n| m | {cell} |\n| ref | — |"


@pytest.mark.slow  # CI's time: 12 s (test_distill_report covers the shared report code)
def test_compare_report_of_hand_made_runs(tmp_path):
    "bench/compare.py --report-only: the table of runs written by hand, its Δ cell computed by hand"
    base = dict(label_fraction=0.1, epochs=10, size=16, lr=3e-3, bs=32, views='reference', ece=0.1, secs=2., n_train=143, n_valid=359)
    methods = ['baseline', 'DSN', 'DKS', 'DHM', 'CDS-SupCon', 'CDS-SimCLR']
    acc = {m: [0.80, 0.90] for m in methods} | {'CDS-SupCon': [0.83, 0.92]}  # +3 and +2 points: mean 2.5, sd 0.707, t(1) 12.706
    rows = [dict(base, method=m, seed=s, acc=acc[m][s]) for s in (0, 1) for m in methods] + [dict(base, method='baseline', seed=2, acc=0.)]
    (tmp_path/'c.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    r = script('compare.py', '--seeds', 3, '--fractions', 0.1, '--out', tmp_path/'c.jsonl', '--report-only')
    assert r.returncode == 0, r.stderr[-3000:]
    hw = 12.706 * math.sqrt(0.5) / math.sqrt(2)
    assert ("digits 16x16, 10% of the training labels (143 images), 10 epochs, 2 paired seeds, 359 validation images\n\n"
            "| method | accuracy % (mean ± std) | Δ vs baseline, points (95% CI) | wins/ties/losses | ECE % (mean ± std) | s/run |\n"
            "|---|---|---|---|---|---|\n| baseline | 85.00 ± 7.07 | — | — | 10.00 ± 0.00 | 2.0 |\n") in r.stdout, r.stdout
    assert f"| CDS-SupCon | 87.50 ± 6.36 | +2.50 [{2.5 - hw:+.2f}, {2.5 + hw:+.2f}] | 2/0/0 | 10.00 ± 0.00 | 2.0 |" in r.stdout, r.stdout



@pytest.mark.slow  # a fresh process importing fastai (~6-13 s) for a table format
def test_distill_report_of_hand_made_runs(tmp_path):
    "bench/distill.py --report-only: the teacher and every method of Table 8's row (+ CDS) in order, on the seeds all finished"
    base = dict(label_fraction=0.1, epochs=6, teacher_epochs=18, teacher_width=48, size=16, lr=3e-3, bs=32, secs=2., n_train=143,
                n_valid=359)
    methods = ['teacher', 'student', 'KD', 'FitNet', 'AT', 'RKD', 'SP', 'CRD', 'CRD+KD', 'KD (T=3, CE)', 'CDS', 'CDS+KD']
    acc = {m: [0.80, 0.90] for m in methods} | {'CRD': [0.77, 0.89], 'teacher': [0.95, 0.97]}  # CRD: -3 and -1 points
    rows = [dict(base, method=m, seed=s, acc=acc[m][s]) for s in (0, 1) for m in methods] + [dict(base, method='student', seed=2, acc=0.)]
    (tmp_path/'d.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    r = script('distill.py', '--seeds', 3, '--fractions', 0.1, '--out', tmp_path/'d.jsonl', '--report-only')
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("digits 16x16, 10% of the training labels (143 images), teacher 18 epochs, students 6 epochs, 2 paired seeds, "
            "359 validation images\n\n| model |") in r.stdout, r.stdout
    names = re.findall(r"^\| (teacher cnn\(48\), CDS|student small_cnn, [^|]+) \|", r.stdout, re.M)
    assert names == ['teacher cnn(48), CDS'] + [f'student small_cnn, {m}' for m in methods[1:]], names
    hw = 12.706 * math.sqrt(2) / math.sqrt(2)  # differences -3, -1: mean -2, sd sqrt(2), t(1) 12.706
    assert f"| student small_cnn, CRD | 83.00 ± 8.49 | -2.00 [{-2 - hw:+.2f}, {-2 + hw:+.2f}] | 0/0/2 | 2.0 |" in r.stdout, r.stdout
    assert "| teacher cnn(48), CDS | 96.00 ± 1.41 | — | — | 2.0 |" in r.stdout, r.stdout

# ---------------------------------------------------------------- the interleaved timer
def test_interleaved_rotates_the_order_and_times_each_step_as_often():
    now, events = [0.], []
    def step(k, secs):
        def f(): events.append(k); now[0] += secs
        return f
    t = interleaved_times({'a': step('a', 1.), 'b': step('b', 2.), 'c': step('c', 4.)}, reps=5, warmup=1,
                          clock=lambda: now[0], sync=lambda: events.append('|'))
    rounds = [''.join(events[i:i+9]).replace('|', '') for i in range(0, len(events), 9)]  # a step between two syncs
    assert rounds == ['abc', 'bca', 'cab', 'abc', 'bca', 'cab']  # each first as often as the others, over 3 rounds
    assert {k: len(v) for k, v in t.times.items()} == {'a': 5, 'b': 5, 'c': 5}
    assert t.median == {'a': 1000., 'b': 2000., 'c': 4000.} and t.ratio('c', 'a') == 4. and t.best_ratio('b', 'a') == 2.


def test_interleaved_medians_and_fastest_steps():
    "The median and the fastest of each step's own times, whatever its position in the rounds"
    secs = {'a': iter([9., 1., 2., 3.]), 'b': iter([9., 4., 6., 5.])}  # the first of each is the warm-up round's
    now = [0.]
    def step(k):
        def f(): now[0] += next(secs[k])
        return f
    t = interleaved_times({'a': step('a'), 'b': step('b')}, reps=3, warmup=1, clock=lambda: now[0])
    assert t.times == {'a': [1., 2., 3.], 'b': [4., 6., 5.]}
    assert (t.median, t.best) == ({'a': 2000., 'b': 5000.}, {'a': 1000., 'b': 4000.})
    assert (t.ratio('b', 'a'), t.best_ratio('b', 'a')) == (2.5, 4.)


# ---------------------------------------------------------------- bench/gpu.py
def gpu_bench(*args):
    return script('gpu.py', *args, cwd=ROOT/'bench')


@pytest.mark.slow  # CI's time: 30 s
def test_gpu_bench_tiny_on_cpu():
    r = gpu_bench('--device', 'cpu', '--tiny')
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [l.split('|')[1:-1] for l in r.stdout.splitlines() if l.startswith('| small CNN')]
    assert [c[2].strip() for c in rows] == ['fp32', 'bf16', 'bf16 + channels-last', 'bf16 + compile'], r.stdout
    for c in rows: assert float(c[5]) == pytest.approx(float(c[3]) / float(c[4]), rel=0.02)  # CDS / plain 2N, from the two medians (printed to 0.1 ms)
    assert re.search(r'two-view CIFAR loader: ours .* [\d,]+ images/s, reference per-item PIL with 0 workers [\d,]+ images/s', r.stdout), r.stdout
    first, last = map(float, re.search(r'loss ([\d.]+) \(first steps\) -> ([\d.]+) \(last steps\): goes down', r.stdout).groups())
    assert last < first


@pytest.mark.slow  # CI's time: a fresh process importing fastai (~10 s)
@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_gpu_bench_without_cuda_says_so_in_one_line():
    r = gpu_bench()
    assert r.returncode == 1 and r.stdout.strip().splitlines() == [
        'bench/gpu.py: CUDA is not available on this machine; run it on a CUDA machine, or try --device cpu --tiny'], r.stdout
