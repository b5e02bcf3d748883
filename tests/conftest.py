"""Suite-wide settings: the tests use small tensors, where intra-op threads only add overhead (and stall
badly when the two cores are busy)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
