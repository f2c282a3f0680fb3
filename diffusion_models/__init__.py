"""diffusion_models: a reproducible benchmark of likelihood-based generative models."""
import os

__version__ = "0.1.0"

# The same arithmetic on every x86 processor. MKL (torch's CPU GEMMs and LAPACK) picks its
# kernels by processor: AVX2 code on an AMD EPYC, AVX-512 code on an Intel Xeon, whose sums
# differ in their low bits; its conditional numerical reproducibility mode COMPATIBLE runs one
# code path on both. oneDNN (convolutions) picks kernels by the instruction set it finds:
# capped at AVX-512 with bf16, the level both processor kinds have. Set before torch's first GEMM or
# convolution (both libraries read them then); a value the user set is kept (and recorded in
# every record's `versions`).
NUMERICS = {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
for _key, _value in NUMERICS.items():
    os.environ.setdefault(_key, _value)
