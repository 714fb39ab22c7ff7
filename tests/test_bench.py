"""bench/gpu.py: the CUDA benchmark's whole path on a CPU with tiny models (`--device cpu --tiny`), and its one-line answer
when asked for CUDA on a machine without it. Run as a script, as a user would."""
import re, subprocess, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_bench(*args):
    return subprocess.run([sys.executable, str(ROOT/'bench/gpu.py'), *args], capture_output=True, text=True, timeout=600, cwd=ROOT/'bench')


def test_gpu_bench_tiny_on_cpu():
    r = gpu_bench('--device', 'cpu', '--tiny')
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [l.split('|')[1:-1] for l in r.stdout.splitlines() if l.startswith('| small CNN')]
    assert [c[2].strip() for c in rows] == ['fp32', 'bf16', 'bf16 + channels-last', 'bf16 + compile'], r.stdout
    for c in rows: assert float(c[5]) == pytest.approx(float(c[3]) / float(c[4]), rel=0.02)  # CDS / plain 2N, from the two medians (printed to 0.1 ms)
    assert re.search(r'two-view CIFAR loader: ours .* [\d,]+ images/s, reference per-item PIL with 0 workers [\d,]+ images/s', r.stdout), r.stdout
    first, last = map(float, re.search(r'loss ([\d.]+) \(first steps\) -> ([\d.]+) \(last steps\): goes down', r.stdout).groups())
    assert last < first


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_gpu_bench_without_cuda_says_so_in_one_line():
    r = gpu_bench()
    assert r.returncode == 1 and r.stdout.strip().splitlines() == [
        'bench/gpu.py: CUDA is not available on this machine; run it on a CUDA machine, or try --device cpu --tiny'], r.stdout
