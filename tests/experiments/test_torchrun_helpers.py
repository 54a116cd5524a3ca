"""The small pieces behind ``soaplab compare`` under torchrun, in one process (the runs under
torchrun itself are in tests/distributed/test_torchrun.py)."""

import pytest
import torch
import torch.distributed as dist

import soaplab
from soaplab.experiments import ddp


def test_one_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with ddp.session("cpu"):
        assert not dist.is_initialized()
        assert (ddp.world_size(), ddp.rank(), ddp.is_main(), ddp.group()) == (1, 0, True, None)
        model = torch.nn.Linear(2, 2)
        assert ddp.wrap(model) is model
        batch = (torch.arange(6), torch.arange(6) + 1)
        assert all(torch.equal(a, b) for a, b in zip(ddp.shard(batch), batch, strict=True))
        assert ddp.mean(torch.tensor(2.5)).item() == 2.5 and ddp.maximum(7) == 7
        assert ddp.from_main(lambda: [1, 2]) == [1, 2]


def test_each_rank_trains_on_its_contiguous_slice(monkeypatch):
    monkeypatch.setattr(ddp, "world_size", lambda: 2)
    monkeypatch.setattr(ddp, "rank", lambda: 1)
    x, y = ddp.shard((torch.arange(8), torch.arange(16).view(8, 2)))
    assert x.tolist() == [4, 5, 6, 7] and y[:, 0].tolist() == [8, 10, 12, 14]
    with pytest.raises(ValueError, match="--batch-size 5 does not split evenly over 2 ranks"):
        ddp.shard((torch.arange(5),))


def test_torchrun_environment(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not ddp.restarted() and ddp.device("cuda") == "cuda"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert ddp.restarted() and ddp.device("cuda") == "cuda:3" and ddp.device("cpu") == "cpu"


def test_registry_hands_the_process_group_to_soaplab_optimizers_only():
    params = [torch.nn.Parameter(torch.ones(3, 3))]
    group = object()  # not a real group: only soaplab's optimizers look at it
    assert isinstance(soaplab.optimizer("adamw", params, process_group=group, lr=1e-3),
                      torch.optim.AdamW)
    for name in ("soap", "shampoo_half"):
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            soaplab.optimizer(name, params, process_group=group)
