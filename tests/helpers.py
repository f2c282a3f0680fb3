"""Small shared test data: dataset shapes and seeded integer images."""
import pytest
import torch

from diffusion_models import data

SHAPES = {"digits": ((1, 8, 8), 17), "mnist": ((1, 28, 28), 256), "cifar10": ((3, 32, 32), 256)}


def uniform(n, shape=(1, 8, 8), levels=17, seed=0):
    """n images with i.i.d. uniform pixels in {0..levels-1}."""
    return torch.randint(0, levels, (n, *shape), generator=torch.Generator().manual_seed(seed))


def digits_train():
    return torch.from_numpy(data.load("digits", "train").images).long()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Imported by a test module: its tests run on one intra-op thread (tiny tensors, where
    threads only add overhead and stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
