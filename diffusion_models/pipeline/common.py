"""What every pipeline stage shares: the file layout, params checks, records and the rule
that a stage whose inputs have not changed rewrites nothing."""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from .. import data, models
from ..config import Config
from ..runtime import digest as content_digest
from ..runtime import (die_with_parent, file_digest, read_json, resolve_device, retain_freed_memory, source_digest,
                       write_json)

PREPARED = Path("data/prepared")
RESULTS = Path("results")
CHECKPOINTS = RESULTS / "checkpoints"
TRAIN_RECORDS = RESULTS / "train"
EVAL_RECORDS = RESULTS / "eval"
METRICS = RESULTS / "metrics"        # compact numeric summaries: what `dvc metrics show` lists
LIVE = RESULTS / "live"
RESUME = RESULTS / "resume"          # mid-training states (git- and DVC-ignored)
FEATURES = RESULTS / "features"      # reference statistics of the FID feature extractors
REFERENCE_CACHE = FEATURES / "reference"
SAMPLE_RECORDS = RESULTS / "sample"
GRIDS = RESULTS / "samples"

# dvc.yaml is the one list of what a stage depends on: a record or checkpoint a stage keeps was
# made by exactly the package files that dvc.yaml lists for it (stage_sources), so DVC reruns a
# stage exactly when its kept results would be stale.
DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"  # the repository this package is in
PACKAGE = "diffusion_models/"
MODELS_DIR = PACKAGE + "models"  # per model: only its own modules (model_sources)


@functools.cache
def stage_sources(stage: str) -> tuple[str, ...]:
    """The package files (relative to the package) that dvc.yaml lists as dependencies of
    `stage` (a per-model stage's `do` block); a listed folder stands for every .py file in it. The
    models folder is left out: a per-model stage hashes its own model's modules instead."""
    if not DVC_YAML.is_file():
        raise StageError(f"no {DVC_YAML.name} beside the package ({DVC_YAML}): the pipeline's stages "
                         "run from the repository")
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    if stage not in stages:
        raise StageError(f"{DVC_YAML} has no stage '{stage}'")
    spec = stages[stage].get("do", stages[stage])
    root = DVC_YAML.parent
    out: set[str] = set()
    for dep in spec.get("deps", []):
        if not dep.startswith(PACKAGE) or dep.rstrip("/") == MODELS_DIR:
            continue
        path = root / dep
        # a folder's code only: data files in it (the FID classifiers of assets/) are inputs the
        # records name by their own SHA-256, so another dataset's classifier changes no digest
        files = sorted(f for f in path.rglob("*.py") if f.is_file() and "__pycache__" not in f.parts) \
            if path.is_dir() else [path]
        out |= {f.relative_to(root / PACKAGE).as_posix() for f in files}
    return tuple(sorted(out))


# what identifies a checkpoint in records: its run, grid point and compute; its validation bound
# and whether it is the run's selected checkpoint (the best validation bound: what tables report)
RUN_FIELDS = ("seed", "fraction", "images_seen", "train_flops", "val_bpd", "selected")

_START = [time.perf_counter()]


def start_clock() -> None:
    _START[0] = time.perf_counter()


def stage_seconds() -> float:
    """Wall time of this stage's work, without the process's imports."""
    return time.perf_counter() - _START[0]


class StageError(RuntimeError):
    """A stage cannot run with the given params/files; the message says why."""


def model_overrides(cfg: Config, name: str) -> dict[str, Any]:
    """Model `name`'s params entry (its config overrides; `class` for a model defined outside
    the package, registered here too, so a spawned worker process finds it)."""
    models.use_plugins({name: cfg.models.get(name) or {}})
    models.get(name)  # unknown model: error naming it and the registered ones
    if name not in cfg.models:
        raise StageError(f"model '{name}' is not listed under 'models' in params.yaml "
                         f"(listed: {', '.join(cfg.models)})")
    return cfg.models[name]


def setup_torch(cfg: Config, device: str | None) -> torch.device:
    """The stage's device (train.device unless `device`) and threads; on CUDA, TF32 off for
    matmuls and cuDNN convolutions (PyTorch's cuDNN default is on): fp32 means fp32 everywhere."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    dev = resolve_device(device or cfg.train.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


def split(cfg: Config, name: str) -> data.Dataset:
    """A prepared split (train | val | test), refused if it is another dataset than params say."""
    ds = data.load_prepared(PREPARED / f"{name}.npz")
    if ds.name != cfg.data.name:
        raise StageError(f"prepared data is '{ds.name}' but params say data.name='{cfg.data.name}': "
                         "rerun the prepare stage")
    return ds


def to_tensor(ds: data.Dataset, dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(ds.images.astype(np.int64)).to(dev)


def run_seeds(cfg: Config) -> list[int]:
    """The training seeds of every model: train.seed, +1, ... (train.seeds or the dataset's default)."""
    n = cfg.train.seeds or data.spec(cfg.data.name).seeds
    return [cfg.train.seed + i for i in range(n)]


def checkpoint_path(name: str, seed: int, fraction: float) -> Path:
    return CHECKPOINTS / name / f"seed{seed}-{fraction * 100:g}pct.pt"


def model_sources(name: str, stage: str) -> list[str]:
    """Package-relative source files whose code defines model `name` (its class and base
    classes, the registry) plus what dvc.yaml lists for `stage`: what a run key hashes."""
    own = {c.__module__.removeprefix("diffusion_models.").replace(".", "/") + ".py"
           for c in models.get(name).__mro__ if c.__module__.startswith("diffusion_models.")}
    return sorted(own | {"models/__init__.py", "models/base.py"} | set(stage_sources(stage)))


def code_digest(name: str, stage: str) -> str:
    """SHA-1 of the code a per-model stage's results for model `name` are made by: the package
    files of `model_sources` and, for a model defined outside the package, its own modules
    (named by module, so the digest is the same wherever the repository lies)."""
    digest = source_digest(tuple(model_sources(name, stage)))
    outside = models.outside_sources(name)
    if not outside:
        return digest
    return content_digest(digest.encode(), *(module.encode() + b"\0" + file.read_bytes() + b"\0"
                                             for module, file in outside))


def file_sha1(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        hint = " (missing prepared data: run the prepare stage, `dvc repro prepare`)" if path.parent == PREPARED else ""
        raise StageError(f"missing file: {path}{hint}")
    return file_digest(path)


def unchanged(path: Path, inputs: dict[str, Any]) -> bool:
    """Whether the record at `path` was made from exactly `inputs` (then the stage has nothing
    to do and rewrites nothing, so the stages after it stay up to date)."""
    if not path.is_file():
        return False
    try:
        return read_json(path).get("inputs") == inputs
    except ValueError:
        return False


def train_record(cfg: Config, name: str) -> dict[str, Any]:
    """What the train stage recorded for `name`, including its runs (a row per checkpoint: seed,
    fraction, path, training result, validation bound, `selected`); refused if params now give
    other seeds."""
    model_overrides(cfg, name)
    rec = read_json(TRAIN_RECORDS / f"{name}.json")
    if rec["seeds"] != run_seeds(cfg):
        raise StageError(f"{TRAIN_RECORDS / name}.json has seeds {rec['seeds']}, params give "
                         f"{run_seeds(cfg)}: rerun the train stage")
    return rec


def load_model(cfg: Config, name: str, dev: torch.device, path: str | Path) -> models.Model:
    """A trained checkpoint of `name`, refused if params now give a different model config."""
    overrides = model_overrides(cfg, name)
    model, state = models.load(path, map_location=dev)
    expected = dataclasses.asdict(models.make_config(name, overrides))
    if state["config"] != expected:
        raise StageError(f"checkpoint {path} was trained with model config "
                         f"{state['config']}, params.yaml now gives {expected}: retrain it")
    return model.to(dev)


def write_record(path: Path, record: dict[str, Any]) -> None:
    record["stage_seconds"] = stage_seconds()
    write_json(path, record)


def parallel_runs(cfg: Config, n_runs: int, dev: torch.device, world: int = 1) -> tuple[int, int]:
    """(worker processes, intra-op threads each) for `n_runs` independent training runs. On a
    CPU with two or more threads: one process per run, up to twice the threads
    (`train.workers` caps it), the threads shared out between them (at least one each). Small
    convolutions use two threads poorly, so on the 2-core Intel Xeon two one-thread runs side
    by side trained 1.1-1.7x faster than the same runs in turn (benchmarks: test_parallel_runs);
    and a third run beside them costs no throughput where waiting for a free core leaves one
    idle: three one-thread processes on two cores trained 7,776 vae and 2,612 pixelcnn images/s
    in all against 8,031 and 2,696 for two (Intel Xeon; AMD EPYC Zen 3: 2,850 against 2,900
    vae), so three seeds end in about 3/4 of the time of two-then-one. On one thread, on a GPU,
    under torchrun, or for a single run: the runs in turn in this process, with its threads."""
    threads = torch.get_num_threads()  # after setup_torch: train.threads, or the library default
    if dev.type != "cpu" or world > 1 or n_runs < 2 or cfg.train.workers == 1 or threads < 2:
        return 1, threads
    workers = min(n_runs, cfg.train.workers or 2 * threads)
    return workers, max(1, threads // workers)


_WORKER: dict[str, Any] = {}  # in a worker process of in_workers: its message queue


def _start_worker(threads: int, queue: Any) -> None:
    torch.set_num_threads(threads)
    retain_freed_memory()  # as the command line does for the stage's own process
    die_with_parent()
    _WORKER["send"] = queue.put


def _run_job(fn: Callable[..., Any], job: tuple[Any, ...]) -> Any:
    return fn(*job, send=_WORKER["send"])


def in_workers(fn: Callable[..., Any], jobs: list[tuple[Any, ...]], workers: int, threads: int,
               on_message: Callable[[Any], None] | None = None) -> list[Any]:
    """fn(*job, send=...) for every job, results in job order. With `workers` 1: in turn in this
    process, with `send` = on_message. Otherwise in that many spawned processes with `threads`
    intra-op threads each (and this process's allocator setting; each dies with this process),
    whose `send(message)` reaches on_message here, in a thread of this process, as they run.
    An error of one job is raised here once the other jobs have finished, so whatever they
    finish stays on disk."""
    if workers == 1:
        return [fn(*job, send=on_message) for job in jobs]
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # not fork: this process may hold OpenMP threads
    queue = ctx.Queue()
    failed: list[BaseException] = []

    def drain() -> None:
        while (message := queue.get()) is not None:
            try:
                if on_message is not None and not failed:
                    on_message(message)
            except BaseException as e:  # keep draining, so no worker blocks on a full pipe
                failed.append(e)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                                 initargs=(threads, queue)) as pool:
            futures = [pool.submit(_run_job, fn, job) for job in jobs]
            wait(futures)
    finally:  # the workers have exited (their messages are in the pipe): end the reader after them
        queue.put(None)
        reader.join()
    results = [f.result() for f in futures]
    if failed:
        raise failed[0]
    return results
