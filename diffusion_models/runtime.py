"""Run environment helpers: devices, seeds, library versions, atomic file writes."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

PACKAGES = ("torch", "torchmetrics", "torch-fidelity", "dvc", "dvclive", "pandas", "numpy")


class QualityError(RuntimeError):
    """Sample-quality metrics cannot be computed as configured; the message says why (defined
    here, not in quality.py, so that the CLI can catch it without importing torch-fidelity)."""


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device '{name}'; use auto, cpu or cuda[:N]")
    return dev


def digest(*parts: bytes, algorithm: str = "sha1") -> str:
    """Hex digest of byte strings, in turn: every content hash of the suite (files, sources,
    arrays) is this one. SHA-1 in the records, SHA-256 for shipped weights and pinned data
    files, MD5 for data.dvc's pins."""
    h = hashlib.new(algorithm)
    for part in parts:
        h.update(part)
    return h.hexdigest()


def file_digest(path: str | Path, algorithm: str = "sha1") -> str:
    """`digest` of a file's bytes."""
    return digest(Path(path).read_bytes(), algorithm=algorithm)


@functools.cache
def source_digest(files: tuple[str, ...]) -> str:
    """SHA-1 of the named source files of this package (paths relative to it): what a kept
    checkpoint or a stage's record must have been made by."""
    root = Path(__file__).resolve().parent
    missing = [root / name for name in files if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"source digest: no file {missing[0]}")
    return digest(*(name.encode() + b"\0" + (root / name).read_bytes() + b"\0" for name in sorted(files)))


@functools.cache
def processor() -> str:
    """The CPU's model name (timings and low bits of results depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    n = torch.get_num_threads()
    return f"cpu ({processor()}, {platform.machine()}, {n} thread{'s' if n != 1 else ''})"


# glibc malloc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)


def retain_freed_memory() -> bool:
    """Keep freed CPU tensor memory in this process instead of handing it back to the OS.

    PyTorch's CPU tensors come from the C allocator. glibc serves blocks above its mmap
    threshold with fresh mmaps and trims the heap's free top once it exceeds its trim
    threshold, so a network whose activations are freed after every forward pass gets new,
    untouched pages in the next one: a minor page fault per 4 KiB page. Measured on a 2-core
    Intel Xeon: 75,000 faults per 20-step DPM-Solver++ sample of 256 digits and 2,300 per
    `ddpm` training step; with both thresholds raised (mmap: 32 MiB, glibc's maximum;
    trim: 2 GiB) none in a typical pass after warm-up (now and then one pass still grows the heap
    once, by a few hundred pages). Numbers do not change (the same 64-byte-aligned blocks,
    only reused); resident memory stays at its peak instead of shrinking between passes.
    Process-wide, so the command line and the benchmarks call it, not the library import.
    Returns whether it took effect (glibc only; elsewhere the allocator is left alone)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_TRIM_THRESHOLD is a size_t inside glibc but an int here: 2^31 - 1 is the most it takes
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so that a worker
    process never outlives a stage that was killed (`kill -9`, a cancelled `dvc repro`) and
    keeps writing its outputs. Returns whether it took effect."""
    if platform.system() != "Linux":
        return False
    import ctypes
    import signal

    parent = os.getppid()
    ok = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if os.getppid() != parent:  # the parent died before the request: nobody will send the signal
        os._exit(1)
    return ok


def matmul_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """This CPU's matmul rate in `dtype` (FLOP/s): the best of `repeats` n x n GEMMs after one
    warm-up (the benchmarks' peak; no setting is ever chosen from it)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block, restored after it."""
    outer = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(outer)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def versions() -> dict[str, str]:
    from . import NUMERICS

    out = {"python": platform.python_version(), "processor": processor(),
           **{key: os.environ.get(key, "unset") for key in NUMERICS}}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    return json.loads(path.read_text())


class Progress:
    """Progress of a long loop: a tqdm bar on a terminal; otherwise (under `dvc repro`, in CI)
    a plain line every `every` seconds with the count, rate, ETA and the latest postfix."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, unit: str = "it", every: float = 10.0,
                 enabled: bool = True):
        self.total, self.desc, self.n, self.unit, self.every = total, desc, initial, unit, every
        self.enabled, self.postfix = enabled, ""
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, mininterval=2.0)
        self.start = self.last = time.perf_counter()
        self.start_n = initial

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def update(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            rate = (self.n - self.start_n) / max(self.last - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            print(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} ({self.n / self.total:.0%}), "
                  f"{rate:,.0f} {self.unit}/s, ETA {eta:.0f} s" + (f", {self.postfix}" if self.postfix else ""),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
