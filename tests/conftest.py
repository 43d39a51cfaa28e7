import pytest
import torch

#: A DiT small enough for a training step in a fraction of a second.
TINY_DIT = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: syncing threads costs more than it saves, all the more on a shared CPU."""
    torch.set_num_threads(1)
