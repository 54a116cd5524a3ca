"""One torch thread for these tiny models: on a shared 2-core machine two threads spin-wait
on each other and run an order of magnitude slower, and one is as fast when the CPU is free."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
