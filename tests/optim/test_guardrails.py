"""The construction-time warning for factors far costlier than their parameter."""

import warnings

import pytest
import torch
from torch import nn

import soaplab
from soaplab.optim.guardrails import costly_factors


def test_merged_small_convs_warn_with_name_bytes_and_the_fix():
    model = nn.Sequential(nn.Conv2d(32, 32, 3))
    with pytest.warns(UserWarning, match=r"parameter '0.weight' with shape \(32, 32, 3, 3\) "
                      r"gets a 9216x9216 factor: about 679 MB .* 0.037 MB parameter; "
                      r"merge_dims=True merged its axes: pass merge_dims=False"):
        soaplab.SOAP(model, merge_dims=True)


@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_an_embedding_just_under_max_precond_dim_warns_and_a_longer_one_does_not(name):
    with pytest.warns(UserWarning, match=r"gets a 2048x2048 factor: about 33.6 MB .* 0.52 MB "
                      r"parameter; send it to AdamW .* max_precond_dim < 2048"):
        soaplab.optimizer(name, nn.Embedding(2048, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soaplab.optimizer(name, nn.Embedding(2048, 64), max_precond_dim=1024)
        soaplab.optimizer(name, nn.Linear(512, 512))  # an ordinary hidden matrix: 4x, silent
        soaplab.optimizer("soap_hidden", nn.Sequential(nn.Embedding(2048, 64), nn.Linear(64, 4)))


def test_the_cost_is_the_factor_and_basis_of_every_factored_axis():
    with pytest.warns(UserWarning):
        opt = soaplab.SOAP([nn.Parameter(torch.zeros(2048, 64))])
    (line,) = costly_factors(opt)
    assert f"about {2 * 4 * (2048**2 + 64**2) / 1e6:.1f} MB" in line
