"""timm's create_optimizer_v2 builds soaplab's SOAP once registered, with layer decay's
lr_scale honoured by timm's scheduler. Role tests for timm-shaped models run on torch-only
replicas in tests/test_roles.py."""

import pytest
import torch

timm = pytest.importorskip(
    "timm", reason="timm needs torchvision, and the torchvision on the package registry does not "
    "import beside torch 2.13.0 ('operator torchvision::nms does not exist'); torch stays pinned",
    exc_type=ImportError)


def test_create_optimizer_v2_builds_soap_with_layer_decay():
    from timm.scheduler import CosineLRScheduler

    from soaplab.integrations.timm import register

    register()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)
    opt = timm.optim.create_optimizer_v2(model, "soap", lr=1e-3, weight_decay=0.05,
                                         layer_decay=0.75)
    assert type(opt).__name__ == "SOAP"
    sched = CosineLRScheduler(opt, t_initial=10)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        model(torch.randn(2, 3, 32, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step(step + 1)
    scales = {g["lr_scale"] for g in opt.param_groups}
    assert len(scales) > 1
    base = opt.param_groups[0]["lr"] / opt.param_groups[0]["lr_scale"]
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(base * g["lr_scale"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
