"""Shared test set-up: deterministic seeds, CPU flush-denormal, and which tests are slow."""

import pytest
import torch

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Modules whose tests start processes (torchrun ranks, the soaplab command), compile with
# inductor or train whole comparisons: marked slow, so `make test-fast` (-m "not slow") leaves
# them out. `make test` runs everything.
SLOW = ("tests/distributed/", "tests/optim/test_compile.py", "tests/analysis/test_commands.py",
        "tests/experiments/test_compare.py", "tests/experiments/test_run_folders.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
