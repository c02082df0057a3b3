import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' models are tiny: one intra-op thread is faster than two, and much faster when
    other jobs share a 2-core machine. Worker processes of Ray tests set their own."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
