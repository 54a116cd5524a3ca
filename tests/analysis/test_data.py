"""The offline datasets: real digits, standardised, seeded split."""

import torch

from soaplab.analysis import data


def test_digits_split_is_standardised_and_seeded():
    split = data.load("digits", seed=3)
    assert split.x_train.shape[1] == 64 and len(split.x_train) + len(split.x_test) == 1797
    assert set(split.y_train.tolist()) == set(range(10))
    assert split.x_train.mean(0).abs().max() < 1e-5
    torch.testing.assert_close(data.load("digits", seed=3).y_test, split.y_test)
    assert not torch.equal(data.load("digits", seed=4).y_test, split.y_test)
