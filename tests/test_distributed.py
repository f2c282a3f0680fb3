"""Data-parallel training with torchrun (gloo on the CPU): 2 processes give the result of 1
process with the same global batch."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path[:0] = [{tests!r}, {repo!r}]
    from diffusion_models.config import TrainConfig
    from diffusion_models.train import train
    from test_train_report import _Linear

    if "WORLD_SIZE" in __import__("os").environ:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    m = _Linear((1, 4, 4), 17, _Linear.Config())  # a deterministic loss: mean of squared outputs
    m.name = "lin"
    x = torch.randint(0, 17, (96, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    r = train(m, x, TrainConfig(images=16 * 30, batch_size=16, seed=5, log_every=5), progress=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({{"state": m.state_dict(), "loss": r.final_loss}}, sys.argv[1] + f".{{rank}}")
""")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), repo=str(TESTS.parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    one = run(sys.executable, str(script), str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(script), str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    a = torch.load(tmp_path / "one.0", weights_only=True)
    for rank in (0, 1):
        b = torch.load(tmp_path / f"two.{rank}", weights_only=True)
        for k in a["state"]:
            assert torch.allclose(a["state"][k], b["state"][k], rtol=1e-5, atol=1e-6), (rank, k)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
