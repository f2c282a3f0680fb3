"""Speed benchmarks (pytest-benchmark), per registered model at the digits defaults.

    make bench                                   # saves JSON under results/benchmarks/
    .venv/bin/pytest-benchmark compare --storage results/benchmarks 0001 0002
"""
import math
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusion_models import models
from diffusion_models.config import EvalConfig, SampleConfig, TrainConfig
from diffusion_models.runtime import matmul_flops, retain_freed_memory
from diffusion_models.train import clip_gradients, make_optimizer, measure_flops

SHAPE, LEVELS = (1, 8, 8), 17
BATCH = TrainConfig().batch_size


def _model(name):
    torch.manual_seed(0)
    m = models.build(name, shape=SHAPE, levels=LEVELS)
    m.init_from_data(torch.randint(0, LEVELS, (256, *SHAPE)))
    return m


# models fitted in closed form (the baseline) have no training step to time
TRAINABLE = [n for n in models.names() if any(p.requires_grad for p in _model(n).parameters())]


@pytest.fixture(scope="session")
def peak():
    """This machine's matmul peak (FLOP/s), fp32 and bf16, measured now: the best of five 2048^2
    GEMMs (runtime.matmul_flops)."""
    return {label: matmul_flops(dtype, n=2048) for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matmul_peak(benchmark, peak, dtype):
    """The same GEMM under pytest-benchmark's statistics; `peak_for_fractions` is the session
    fixture's measurement that the training steps' fractions divide by."""
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    benchmark.extra_info.update(flops_per_call=2 * n**3,
                                peak_for_fractions=peak["fp32" if dtype == torch.float32 else "bf16"])
    benchmark(torch.mm, a, b)
    if benchmark.stats is not None:
        benchmark.extra_info["flops_per_sec"] = 2 * n**3 / benchmark.stats.stats.median


def _train_step(m, x, precision="fp32"):
    """One training step of `m` on `x` as train.train takes it (fused Adam, gradient clipping)."""
    params = [p for p in m.parameters() if p.requires_grad]
    cfg = TrainConfig()
    opt = make_optimizer(params, cfg)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = m.loss(x)
        loss.backward()
        clip_gradients(params, cfg.grad_clip)
        opt.step()
    return step


def _record_speedup(benchmark, medians: dict[str, float], key: str, baseline: bool) -> None:
    """Side by side in one run: the baseline case stores its median under `key`; the case after
    it gets extra_info['speedup'] = the baseline's median / its own."""
    if benchmark.stats is None:  # --benchmark-disable
        return
    if baseline:
        medians[key] = benchmark.stats.stats.median
    elif key in medians:
        benchmark.extra_info["speedup"] = medians[key] / benchmark.stats.stats.median


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", TRAINABLE)
def test_train_step(benchmark, peak, name, precision):
    """One training step at the default batch; extra_info: measured FLOPs (forward+backward,
    PyTorch's FLOP counter), achieved FLOP/s and its fraction of the fp32 matmul peak."""
    m = _model(name)
    x = torch.randint(0, LEVELS, (BATCH, *SHAPE))
    flops = measure_flops(m, x) * BATCH
    step = _train_step(m, x, precision)
    benchmark.extra_info.update(images_per_call=BATCH, flops_per_call=flops, peak_fp32=peak["fp32"],
                                peak_bf16=peak["bf16"])
    benchmark(step)
    if benchmark.stats is not None:
        achieved = flops / benchmark.stats.stats.median
        benchmark.extra_info.update(flops_per_sec=achieved, fraction_of_fp32_peak=achieved / peak["fp32"],
                                    fraction_of_bf16_peak=achieved / peak["bf16"])


@pytest.mark.parametrize("name", models.names())
def test_bound(benchmark, name):
    m = _model(name)
    est = m.estimators(EvalConfig(iwae_k=100, dequant_k=100))[-1 if m.family != "diffusion" else 0]  # ODE: below
    label, kwargs = est.label, est.options
    x = torch.randint(0, LEVELS, (64, *SHAPE))
    benchmark.extra_info.update(estimator=label, examples_per_call=64)
    benchmark(lambda: m.nll_bound(x, **kwargs))


_CHUNK_MEDIANS: dict[str, float] = {}


@pytest.mark.parametrize("name, chunk", [(n, c) for n in ("vae", "hvae", "flow") for c in (4096, 2048, 1024)])
def test_bound_chunk(benchmark, name, chunk):
    """The K = 1000 bound (IWAE-1000; the flow's dequantized K = 1000) of 64 images with at most
    `chunk` rows per network pass (`evaluate.chunk`); extra_info: `speedup` over 4096, the
    default before, measured in this run."""
    m = _model(name).eval()
    est = m.estimators(EvalConfig(iwae_k=1000, dequant_k=1000, chunk=chunk))[-1]
    label, kwargs = est.label, est.options
    x = torch.randint(0, LEVELS, (64, *SHAPE))
    benchmark.extra_info.update(estimator=label, examples_per_call=64, chunk=chunk)
    with torch.no_grad():
        benchmark.pedantic(lambda: m.nll_bound(x, **kwargs), rounds=3, warmup_rounds=1)
    _record_speedup(benchmark, _CHUNK_MEDIANS, name, baseline=chunk == 4096)


SAMPLE_BATCH = 256
SOLVER_MODELS = [n for n in models.names() if "ddim" in models.get(n).samplers]


def _eval_model(name):
    m = _model(name).eval()
    m.requires_grad_(False)
    return m


ROOT = Path(__file__).resolve().parents[1]


def _trained(name, n):
    """The trained seed-0 selected checkpoint the pipeline leaves in results/ (eval mode) and
    the first `n` test images (None: all); the case is skipped, saying why, before `make repro`."""
    import json

    from diffusion_models import data

    record, test = ROOT / "results" / "train" / f"{name}.json", ROOT / "data/prepared/test.npz"
    runs = json.loads(record.read_text())["runs"] if record.is_file() else []
    chosen = [ROOT / r["checkpoint"] for r in runs if r.get("selected") and r["seed"] == 0]
    checkpoint = chosen[0] if chosen else ROOT / "results" / "checkpoints" / name / "seed0-100pct.pt"
    if not (checkpoint.is_file() and test.is_file()):
        pytest.skip(f"needs the pipeline's trained {name} ({checkpoint.relative_to(ROOT)}): run `make repro` first")
    m, _ = models.load(checkpoint)
    return m.eval(), torch.from_numpy(data.load_prepared(test).images[:n].astype("int64"))


@pytest.mark.parametrize("name", SOLVER_MODELS)
def test_network_evaluation(benchmark, name):
    """One network evaluation as the samplers make it (prediction of x0 and eps at one time)."""
    m = _eval_model(name)
    x = torch.randn(SAMPLE_BATCH, *SHAPE)
    t = m.solver_times(10, "trailing")[3]
    benchmark.extra_info["samples_per_call"] = SAMPLE_BATCH
    with torch.no_grad():
        benchmark(lambda: m.denoise(x, t))


@pytest.mark.parametrize("name, sampler", [(n, s) for n in models.names() for s in models.get(n).samplers
                                           if s != "ancestral" or n not in SOLVER_MODELS])
def test_sampler_step(benchmark, name, sampler):
    """One step of each sampler (diffusion: a 1-step solve; VAE/HVAE/baseline: their whole sampler)."""
    m = _eval_model(name)
    kw = ({} if sampler == "ancestral" else {"sampler": sampler, "rtol": 1e-3, "atol": 1e-3} if sampler == "ode"
          else {"sampler": sampler, "steps": 1})
    benchmark.extra_info.update(samples_per_call=SAMPLE_BATCH, nfe=m.nfe(**kw))
    benchmark(lambda: m.sample(SAMPLE_BATCH, **kw))


_S = SampleConfig()
HEADLINE = {"sampler": _S.sampler, "steps": _S.steps, "spacing": _S.spacing}  # the pipeline's headline sampler
NETWORK_MODELS = [n for n in models.names() if _model(n).nfe_module() is not None]
# hvae's NFE module is the decoder head that ends each top-down pass, not the pass itself, so
# forward hooks on it cannot separate network time from loop time
WHOLE_NETWORK_MODELS = [n for n in NETWORK_MODELS if n != "hvae"]


def _sampler_kwargs(sampler):
    return {"sampler": sampler, "steps": HEADLINE["steps"], "spacing": HEADLINE["spacing"]} if sampler else {}


@pytest.mark.parametrize("name, sampler", [(n, s) for n in WHOLE_NETWORK_MODELS
                                           for s in (("ddim", "dpm++2m") if n in SOLVER_MODELS else (None,))])
def test_sampler_overhead(benchmark, name, sampler):
    """The sampler's loop overhead at batch 256: diffusion DDIM and DPM-Solver++ at the headline
    20 steps, the other models their own sampler (pixelcnn: one pass per sub-pixel).
    extra_info['overhead'] = (time outside the network) / (time inside it), both from the same
    runs (forward hooks on the module one call of which is one network evaluation)."""
    m = _eval_model(name)
    kw = _sampler_kwargs(sampler)
    m.sample(SAMPLE_BATCH, **kw)  # warm-up, before the timing hooks
    inside, start = [0.0], [0.0]
    net = m.nfe_module()
    net.register_forward_pre_hook(lambda *a: start.__setitem__(0, time.perf_counter()))
    net.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] + time.perf_counter() - start[0]))
    rounds = 3 if name == "pixelcnn" else 20
    benchmark.pedantic(lambda: m.sample(SAMPLE_BATCH, **kw), rounds=rounds, iterations=1)
    if benchmark.stats is not None:  # None when run with --benchmark-disable
        total = benchmark.stats.stats.total
        benchmark.extra_info.update(samples_per_call=SAMPLE_BATCH, nfe=m.nfe(**kw), network_seconds=inside[0],
                                    sampler_seconds=total, overhead=(total - inside[0]) / inside[0])


def _naive_divergence(fn, x):
    """The straightforward way: the batch's full Jacobian by autograd, then each example's trace."""
    b, d = len(x), x[0].numel()
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(lambda u: fn(u).sum(0), x).reshape(d, b, d)
    return fn(x), torch.stack([jac[:, i, :].diagonal().sum() for i in range(b)])


ODE_BATCH = 32


_ODE_BATCH_MEDIANS: dict[str, float] = {}


@pytest.mark.parametrize("batch", [64, 128])
@pytest.mark.parametrize("name", ["ddpm", "iddpm", "vdm"])
def test_ode_bound_batch(benchmark, name, batch):
    """The pipeline's ODE bound (its default settings: the first 100 test images) of the trained
    seed-0 model, solved in batches of `batch` (`evaluate.ode.batch_size`; 64, evaluate.batch_size,
    is how it was solved before: 64 + 36). A batch's adaptive solve shares its steps, and its
    small network passes are overhead-bound, so fewer, larger solves cost less. extra_info:
    `speedup` over 64 measured in this run, NFE per solve, the bound (bits/dim)."""
    ecfg = EvalConfig()
    ecfg.ode.batch_size, ecfg.ode.check_tol = batch, None  # the bound alone (the check: one run's extra)
    m, x = _trained(name, ecfg.ode.n_test)
    est = m.estimators(ecfg)[-1]
    label, kwargs = est.label, est.options
    n = len(x)
    nfe, bound = [], []

    def solve():
        torch.manual_seed(0)
        parts = [m.nll_terms_profile(x[i: i + batch], **kwargs) for i in range(0, n, batch)]
        nfe.append([profile["nfe"] for _, profile in parts])
        bound.append(torch.cat([sum(terms.values()) for terms, _ in parts]).double().mean().item())

    benchmark.extra_info.update(estimator=label, examples=n, batch=batch)
    benchmark.pedantic(solve, rounds=3, iterations=1)
    benchmark.extra_info.update(nfe_per_solve=nfe[-1], bpd=bound[-1] / (m.dims * math.log(2)))
    _record_speedup(benchmark, _ODE_BATCH_MEDIANS, name, baseline=batch == 64)


@pytest.mark.parametrize("method", ["vmap_jvp", "naive_jacobian", "hutchinson"])
@pytest.mark.parametrize("name", ["ddpm", "vdm"])
def test_ode_divergence(benchmark, name, method):
    """One function evaluation of the ODE likelihood (the eps prediction and its divergence) at
    batch 32: ode.divergence's D JVPs batched by torch.func.vmap, against the full Jacobian by
    autograd (the straightforward implementation), and one Hutchinson probe; the ratio of the
    first two medians is the speed-up of the exact divergence."""
    from diffusion_models import ode

    m = _eval_model(name)
    x, lam = torch.randn(ODE_BATCH, *SHAPE), torch.tensor(1.0)
    fn = lambda u: m.ode_eps(u, lam)  # noqa: E731
    probes = ode.rademacher(1, tuple(x.shape), None, "cpu") if method == "hutchinson" else None
    call = (lambda: _naive_divergence(fn, x)) if method == "naive_jacobian" else (lambda: ode.divergence(fn, x, probes))
    with torch.no_grad():
        assert torch.allclose(ode.divergence(fn, x, None)[1], _naive_divergence(fn, x)[1], rtol=1e-4, atol=1e-3)
        benchmark.extra_info["examples_per_call"] = ODE_BATCH
        benchmark(call)


@pytest.mark.parametrize("name", [n for n in models.names() if "ode" in models.get(n).samplers])
def test_ode_bound(benchmark, name):
    """The pipeline's ODE bound (its default settings) on 32 test-shaped images of an untrained
    model: seconds per image and NFE (extra_info); trained models' figures are in the evaluate
    records (`nfe`, `seconds`)."""
    m = _eval_model(name)
    ecfg = EvalConfig()
    ecfg.ode.check_tol = None  # the bound alone (the solver check runs on one run of the pipeline)
    est = m.estimators(ecfg)[-1]
    label, kwargs = est.label, est.options  # (est.max_examples, est.batch_size: evaluate_bounds')
    x = torch.randint(0, LEVELS, (ODE_BATCH, *SHAPE))
    nfe = []
    benchmark.extra_info.update(estimator=label, examples_per_call=ODE_BATCH)
    benchmark.pedantic(lambda: nfe.append(m.nll_terms_profile(x, **kwargs)[1]["nfe"]), rounds=3, iterations=1)
    benchmark.extra_info["nfe"] = statistics.fmean(nfe)


@pytest.mark.parametrize("name", ("ddpm", "vdm", "vae"))
@pytest.mark.parametrize("variant", ("default", "loop_adam", "channels_last", "threads1", "compile"))
def test_train_step_settings(benchmark, name, variant):
    """Settings tried side by side against the default fp32 training step (keep what pays).
    default: train.train's step (fused Adam, multi-tensor gradient clipping); loop_adam:
    PyTorch's CPU default before (Adam and clipping as Python loops over the parameters)."""
    m = _model(name)
    x = torch.randint(0, LEVELS, (BATCH, *SHAPE))
    if variant == "channels_last":
        m = m.to(memory_format=torch.channels_last)
    loss_fn = torch.compile(m.loss) if variant == "compile" else m.loss
    params = [p for p in m.parameters() if p.requires_grad]
    cfg = TrainConfig()
    opt = torch.optim.Adam(params, lr=cfg.lr) if variant == "loop_adam" else make_optimizer(params, cfg)
    threads = torch.get_num_threads()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        if variant == "loop_adam":
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=False)
        else:
            clip_gradients(params, cfg.grad_clip)
        opt.step()

    if variant == "threads1":
        torch.set_num_threads(1)
    try:
        step()  # compile / warm-up outside the timing
        benchmark.extra_info.update(images_per_call=BATCH, threads=torch.get_num_threads())
        benchmark(step)
    finally:
        torch.set_num_threads(threads)


def _precision_check() -> dict[str, dict]:
    """results/precision_check.csv (written by the pipeline's compare stage on the trained
    models) by model: the FID change of bf16 sampling against the seed spread; {} if absent."""
    path = Path(__file__).resolve().parents[1] / "results" / "precision_check.csv"
    if not path.is_file():
        return {}
    import pandas as pd

    return {r["model"]: r for r in pd.read_csv(path).to_dict("records")}


_FP32_MEDIANS: dict[str, float] = {}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", NETWORK_MODELS)
def test_sampling_precision(benchmark, name, precision):
    """The headline sampler (diffusion: DPM-Solver++ 20 steps; the others their own) at batch
    256 through draw_samples, the network in fp32 or under bf16 autocast (`sample.precision`).
    extra_info of the bf16 case: `speedup` (the fp32 case's median / this median, measured side
    by side in this run) and, from the pipeline's check on the trained models
    (results/precision_check.csv, when present), `fid_delta` (bf16 - fp32 on the same noise),
    `fid_seed_std` and whether the change is within the seed spread."""
    from diffusion_models.evaluate import draw_samples

    m = _eval_model(name)
    kw = HEADLINE if name in SOLVER_MODELS else {}
    draw_samples(m, SAMPLE_BATCH, SAMPLE_BATCH, precision=precision, **kw)  # warm-up
    benchmark.extra_info.update(samples_per_call=SAMPLE_BATCH, nfe=m.nfe(**kw), precision=precision)
    benchmark.pedantic(lambda: draw_samples(m, SAMPLE_BATCH, SAMPLE_BATCH, precision=precision, **kw),
                       rounds=5, iterations=1)
    if benchmark.stats is None:
        return
    benchmark.extra_info["samples_per_sec"] = SAMPLE_BATCH / benchmark.stats.stats.median
    _record_speedup(benchmark, _FP32_MEDIANS, name, baseline=precision == "fp32")
    check = _precision_check().get(name)
    if precision == "bf16" and check is not None:
        benchmark.extra_info.update(fid_delta=check["fid_diff"], fid_seed_std=check["fid_seed_std"],
                                    fid_within_seed_spread=bool(check["within_seed_spread"]))


# ----------------------------------------------------------------------------- VLB estimators
# Precision per unit of compute of the diffusion VLB's estimators, on the trained models the
# pipeline left in results/ (a property of the trained network: an untrained one has another
# profile over t). Needs `make repro` first; without its checkpoints the cases are skipped.
VLB_IMAGES, VLB_REPEATS = 64, 3
VLB_ESTIMATORS = {  # label -> nll_terms keywords
    "exact": {"t_samples": 0}, "log-10": {"t_samples": 10, "spacing": "log"},
    "log-50": {"t_samples": 50, "spacing": "log"}, "uniform-50": {"t_samples": 50, "spacing": "uniform"},
    "log-200": {"t_samples": 200, "spacing": "log"},
}
VDM_ESTIMATORS = {f"stratified-{k}": {"t_samples": k} for k in (10, 50, 200)}
DIFFUSION = [n for n in models.names() if models.get(n).family == "diffusion"]


@pytest.mark.parametrize("name, estimator", [(n, e) for n in DIFFUSION
                                             for e in (VDM_ESTIMATORS if n == "vdm" else VLB_ESTIMATORS)])
def test_vlb_estimator_precision(benchmark, name, estimator):
    """One estimator of the VLB on the first 64 test images of the trained seed-0 model, three
    times with different noise. extra_info: `estimator_var` (the variance of one image's
    estimate over repeats, mean over images, (bits/dim)^2), `image_var` (the variance of the
    bound across images: what the reported standard error is made of),
    `network_evals_per_image` (counted by a hook on the network), `var_x_evals` (estimator
    variance times cost: lower is more precision per FLOP), and `se_inflation` =
    sqrt(1 + estimator_var / image_var), the factor by which the estimator's noise widens the
    reported standard error over the test set."""
    m, x = _trained(name, VLB_IMAGES)
    kwargs = {**(VDM_ESTIMATORS if name == "vdm" else VLB_ESTIMATORS)[estimator], "chunk": 4096}
    rows = [0]
    m.nfe_module().register_forward_hook(lambda mod, inp, out: rows.__setitem__(0, rows[0] + len(out)))
    estimates = []

    def once():
        torch.manual_seed(len(estimates))
        terms = m.nll_terms(x, **kwargs)
        estimates.append(torch.stack(list(terms.values())).sum(0).double() / (m.dims * math.log(2)))

    benchmark.pedantic(once, rounds=VLB_REPEATS, iterations=1)
    if len(estimates) < 2:  # --benchmark-disable: one call, no variance
        return
    est = torch.stack(estimates)  # [repeats, images] bits/dim
    estimator_var = est.var(0).mean().item()
    image_var = est.mean(0).var().item()
    evals = rows[0] / (len(estimates) * VLB_IMAGES)
    benchmark.extra_info.update(estimator=estimator, bpd=est.mean().item(), estimator_var=estimator_var,
                                image_var=image_var, network_evals_per_image=evals,
                                var_x_evals=estimator_var * evals,
                                se_inflation=math.sqrt(1 + estimator_var / image_var))


# ----------------------------------------------------------------------------- CPU allocator
# runtime.retain_freed_memory (the command line's and this module's conftest's setting) against
# glibc's defaults, side by side: each setting in its own worker process (spawned, so the
# default one never saw the call), the same work sent to both.
ALLOCATOR_WORK = ("train-ddpm", "sample-ddpm", "train-vae", "sample-vae")
_WORK: dict[str, Any] = {}


def _allocator_worker_init(retain: bool) -> None:
    if retain and not retain_freed_memory():
        raise RuntimeError("retain_freed_memory had no effect (not glibc?)")


def _allocator_work(work: str) -> int:
    """One call of `work` in a worker process; returns its minor page faults."""
    import resource

    if work not in _WORK:
        kind, name = work.split("-")
        m = _model(name)
        if kind == "train":
            call = _train_step(m, torch.randint(0, LEVELS, (BATCH, *SHAPE)))
        else:
            kw = HEADLINE if name in SOLVER_MODELS else {}
            call = torch.no_grad()(lambda: m.eval().sample(SAMPLE_BATCH, **kw))
        for _ in range(3):  # warm-up: the allocator's pools fill here
            call()
        _WORK[work] = call
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _WORK[work]()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.fixture(scope="module")
def allocator_pools():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pools = {a: ctx.Pool(1, initializer=_allocator_worker_init, initargs=(a == "retained",))
             for a in ("glibc-default", "retained")}
    yield pools
    for p in pools.values():
        p.terminate()


_ALLOC_MEDIANS: dict[str, float] = {}


@pytest.mark.parametrize("work, allocator", [(w, a) for w in ALLOCATOR_WORK for a in ("glibc-default", "retained")])
def test_allocator(benchmark, allocator_pools, work, allocator):
    """A training step (batch 128) or a headline sample (batch 256) of ddpm and vae with glibc's
    default allocator settings and with runtime.retain_freed_memory; extra_info: the minor page
    faults per call (median) and, for `retained`, `speedup` over the default measured in this
    run. The times include a few ms of sending the call to the worker."""
    pool = allocator_pools[allocator]
    faults: list[int] = []
    pool.apply(_allocator_work, (work,))  # build and warm up in the worker
    benchmark.pedantic(lambda: faults.append(pool.apply(_allocator_work, (work,))),
                       rounds=10 if work == "sample-ddpm" else 20, iterations=1)
    benchmark.extra_info.update(minor_faults_per_call=statistics.median(faults), allocator=allocator)
    _record_speedup(benchmark, _ALLOC_MEDIANS, work, baseline=allocator == "glibc-default")


PARALLEL_STEPS = 300  # training steps per run (a pipeline run: 782)
_PARALLEL_WALL: dict[str, float] = {}
_PARALLEL_LOOPS: dict[str, float] = {}


@pytest.mark.parametrize("name, mode", [(n, m) for n in TRAINABLE for m in ("in_turn", "side_by_side")])
def test_parallel_runs(benchmark, name, mode):
    """Two seeds' training runs as the train stage runs them on this CPU (pipeline.common:
    parallel_runs, in_workers): in turn in this process with all its threads, or side by side in
    worker processes sharing them (process start-up included, as in the stage). extra_info:
    the workers and threads each, the training loops' seconds and, for side_by_side, measured
    in this run against in_turn: `speedup` (wall time, start-up included) and `loop_speedup`
    (the two loops in turn, summed, over the longer of the two side by side)."""
    from diffusion_models.config import parse
    from diffusion_models.pipeline.common import in_workers, parallel_runs
    from parallel_runs import fit_steps  # a light module: what each spawned worker imports

    cores = torch.get_num_threads()
    workers, threads = parallel_runs(parse({}), 2, torch.device("cpu")) if mode == "side_by_side" else (1, cores)
    if mode == "side_by_side" and workers == 1:
        pytest.skip(f"one intra-op thread here ({cores}): the stage trains in turn")
    loops: list[float] = []
    benchmark.extra_info.update(runs=2, steps_per_run=PARALLEL_STEPS, workers=workers, threads_each=threads)
    benchmark.pedantic(lambda: loops.extend(in_workers(fit_steps, [(name, s, PARALLEL_STEPS) for s in range(2)],
                                                       workers, threads)), rounds=1, iterations=1)
    loop = sum(loops) if mode == "in_turn" else max(loops)
    benchmark.extra_info["loop_seconds"] = loop
    _record_speedup(benchmark, _PARALLEL_WALL, name, baseline=mode == "in_turn")
    if mode == "in_turn":
        _PARALLEL_LOOPS[name] = loop
    elif name in _PARALLEL_LOOPS:
        benchmark.extra_info["loop_speedup"] = _PARALLEL_LOOPS[name] / loop
