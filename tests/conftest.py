import pytest
import torch

from diffusion_models.runtime import retain_freed_memory

# as the command line does: the tests' many small training runs and samplers reuse freed memory
retain_freed_memory()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
