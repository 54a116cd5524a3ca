"""Shared test set-up: deterministic seeds, CPU flush-denormal, and which tests are slow."""

import pytest
import torch

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Tests that start processes (torchrun ranks, the soaplab command), compile with inductor, train
# whole comparisons or run long convergence races (the last three took 160, 35 and 11 s of CPU
# in `pytest -m "not slow" --durations=30`): marked slow, so `make test-fast` leaves them out.
# `make test` runs everything.
SLOW = ("tests/distributed/", "tests/optim/test_compile.py", "tests/analysis/test_commands.py",
        "tests/experiments/test_compare.py", "tests/experiments/test_run_folders.py",
        "tests/experiments/test_parallel.py",
        "tests/optim/test_soap.py::test_soap_beats_adamw_by_half_the_steps_on_kronecker_least",
        "tests/optim/test_storage.py::test_soap_lowmem_tracks_soap_on_kronecker_least_squares",
        "tests/optim/test_peers.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
