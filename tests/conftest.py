"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors on a 2-core machine: OpenMP barriers cost more than a second thread saves (the probes' own
    CPU loops do the same, see common.cpu_threads). Test files opt in with pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
