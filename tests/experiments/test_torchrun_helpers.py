"""The small pieces behind ``soaplab compare`` under torchrun, in one process (the runs under
torchrun itself are in tests/distributed/test_torchrun.py)."""

import pytest
import torch
import torch.distributed as dist

import soaplab
from soaplab import torchrun


def test_one_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with torchrun.session("cpu"):
        assert not dist.is_initialized()
        assert (torchrun.world_size(), torchrun.rank(), torchrun.is_main(),
                torchrun.group()) == (1, 0, True, None)
        model = torch.nn.Linear(2, 2)
        assert torchrun.wrap(model) is model
        batch = (torch.arange(6), torch.arange(6) + 1)
        assert all(torch.equal(a, b) for a, b in zip(torchrun.shard(batch), batch, strict=True))
        assert torchrun.mean(torch.tensor(2.5)).item() == 2.5 and torchrun.maximum(7) == 7
        assert torchrun.from_main(lambda: [1, 2]) == [1, 2]


def test_each_rank_trains_on_its_contiguous_slice(monkeypatch):
    monkeypatch.setattr(torchrun, "world_size", lambda: 2)
    monkeypatch.setattr(torchrun, "rank", lambda: 1)
    x, y = torchrun.shard((torch.arange(8), torch.arange(16).view(8, 2)))
    assert x.tolist() == [4, 5, 6, 7] and y[:, 0].tolist() == [8, 10, 12, 14]
    with pytest.raises(ValueError, match="--batch-size 5 does not split evenly over 2 ranks"):
        torchrun.shard((torch.arange(5),))


def test_torchrun_environment(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not torchrun.restarted() and torchrun.device("cuda") == "cuda"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert torchrun.restarted() and torchrun.device("cuda") == "cuda:3"
    assert torchrun.device("cpu") == "cpu"


def test_registry_hands_the_process_group_to_soaplab_optimizers_only():
    params = [torch.nn.Parameter(torch.ones(3, 3))]
    group = object()  # not a real group: only soaplab's optimizers look at it
    assert isinstance(soaplab.optimizer("adamw", params, process_group=group, lr=1e-3),
                      torch.optim.AdamW)
    for name in ("soap", "shampoo_half"):
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            soaplab.optimizer(name, params, process_group=group)
