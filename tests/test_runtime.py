"""Process-level runtime: freed tensor memory reused (not faulted in anew), worker processes
that die with their stage, and how training runs share the threads."""
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion_models.runtime import intra_op_threads

REPO = Path(__file__).resolve().parents[1]

# one process per setting: the allocator's settings are process-wide and this session's
# conftest has already retained freed memory
PROBE = """
import resource, statistics, sys, torch
from diffusion_models import models, runtime
if sys.argv[1] == "retain":
    assert runtime.retain_freed_memory()
torch.manual_seed(0)
m = models.build("ddpm", shape=(1, 8, 8), levels=17).eval()
x, a, t = torch.randn(256, 1, 8, 8), torch.ones(256, 1, 1, 1), torch.full((256,), 500.0)
faults = []
with torch.no_grad():
    for _ in range(3):
        m.net(x, a, t)
    for _ in range(15):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        m.net(x, a, t)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


def _faults_per_forward(setting: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_retained_memory_is_reused_without_page_faults():
    """A forward pass of the diffusion network at batch 256 frees ~10 MB of activations. With
    glibc's defaults the next pass faults fresh pages in (thousands of 4 KiB pages: each probe
    measures its own count, so the test shows it can fail); retained, the pages are reused.
    The median pass is compared: with retained memory an occasional pass still grows the heap
    once (a few hundred pages, then none), which is not the per-pass cost this is about."""
    default, retained = _faults_per_forward("default"), _faults_per_forward("retain")
    assert default > 500, f"glibc's default faulted only {default} pages per pass: nothing to show here"
    assert retained < 0.02 * default, (default, retained)


# a job for pipeline.common.in_workers that a spawned worker can import (tests/ is on its path)
SLEEPER = """
import os, time


def job(seconds, send):
    send(os.getpid())
    time.sleep(seconds)
"""
# the stage's side: two jobs in workers, each worker's pid printed as its message arrives
PARENT = """
import sys
import sleeper
from diffusion_models.pipeline.common import in_workers
if sys.argv[1] == "in_workers":
    in_workers(sleeper.job, [(120,), (120,)], 2, 1, on_message=lambda pid: print(pid, flush=True))
else:  # the same jobs in plain spawned processes, which nothing ties to this one
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=sleeper.job, args=(120, queue.put)) for _ in range(2)]
    for w in workers:
        w.start()
    for _ in workers:
        print(queue.get(), flush=True)
    for w in workers:
        w.join()
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has exited


def _orphans_after_kill(tmp_path: Path, mode: str) -> list[int]:
    """Start PARENT in `mode`, SIGKILL it once both workers run, and return the workers still
    alive 10 s later (those are killed here)."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True, env=env)
    pids = [int(parent.stdout.readline()) for _ in range(2)]
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if _alive(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    return alive


@pytest.mark.skipif(platform.system() != "Linux", reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_workers_die_with_a_killed_stage(tmp_path):
    """A stage killed with SIGKILL (kill -9, a cancelled `dvc repro`) takes its training
    workers with it (runtime.die_with_parent), so none keeps writing checkpoints beside a
    rerun; spawned processes without it outlive their parent (the test shows it can fail)."""
    assert len(_orphans_after_kill(tmp_path, "plain")) == 2
    assert _orphans_after_kill(tmp_path, "in_workers") == []


@pytest.mark.parametrize("device, world, threads, runs, workers, expected", [
    ("cpu", 1, 2, 2, 0, (2, 1)),    # one run per thread
    ("cpu", 1, 2, 3, 0, (3, 1)),    # one process per run, sharing the cores
    ("cpu", 1, 2, 5, 0, (4, 1)),    # at most twice the threads
    ("cpu", 1, 8, 2, 0, (2, 4)),    # the threads shared out
    ("cpu", 1, 8, 3, 0, (3, 2)),
    ("cpu", 1, 8, 4, 2, (2, 4)),    # train.workers caps it
    ("cpu", 1, 2, 2, 1, (1, 2)),    # workers: 1, in turn
    ("cpu", 1, 2, 1, 0, (1, 2)),    # a single run
    ("cpu", 1, 1, 2, 0, (1, 1)),    # a single thread
    ("cpu", 2, 2, 2, 0, (1, 2)),    # under torchrun
    ("cuda", 1, 2, 2, 0, (1, 2)),   # on a GPU
])
def test_parallel_runs_share_the_threads(device, world, threads, runs, workers, expected):
    from diffusion_models.config import parse
    from diffusion_models.pipeline.common import parallel_runs

    cfg = parse({"train": {"workers": workers}})
    with intra_op_threads(threads):
        assert parallel_runs(cfg, runs, torch.device(device), world) == expected


def test_mkl_and_onednn_run_the_same_code_path_on_every_x86_processor():
    """Importing the package pins MKL's reproducibility mode (COMPATIBLE: one code path on Intel
    and AMD processors) and caps oneDNN's instruction set before torch's first GEMM: a GEMM
    in a fresh process reports CNR:COMPATIBLE (MKL_VERBOSE), and a value the user set is kept."""
    import os
    import subprocess
    import sys

    code = ("import diffusion_models, torch, os; a = torch.randn(64, 64); a @ a; "
            "print('ISA', os.environ['ONEDNN_MAX_CPU_ISA'])")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MKL_VERBOSE": "1"}, capture_output=True,
                         text=True, check=True).stdout
    assert "CNR:COMPATIBLE" in out and "ISA AVX512_CORE_BF16" in out, out
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MKL_VERBOSE": "1", "MKL_CBWR": "AUTO"},
                         capture_output=True, text=True, check=True).stdout
    assert "CNR:COMPATIBLE" not in out and "CNR:" in out, out
