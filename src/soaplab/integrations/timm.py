"""timm: ``soaplab.integrations.timm.register()`` once, then
``timm.optim.create_optimizer_v2(model, "soap", lr=..., weight_decay=..., layer_decay=...)``.

timm builds the groups (no decay on 1-D parameters and ``model.no_weight_decay()``; with
``layer_decay`` an ``lr_scale`` per group, which timm's schedulers multiply into the lr;
soaplab keeps such extra group keys). timm reads the name after the last ``_`` as the
optimizer, so only names without one are registered: ``soap`` and ``shampoo``.
"""

from __future__ import annotations

from soaplab.optim import SOAP, Shampoo


def register() -> None:
    """Register soaplab's SOAP and Shampoo in timm's default optimizer registry."""
    from timm.optim import OptimInfo
    from timm.optim._optim_factory import default_registry

    for name, cls in (("soap", SOAP), ("shampoo", Shampoo)):
        default_registry.register(OptimInfo(name=name, opt_class=cls, has_betas=True,
                                            description=f"soaplab's {cls.__name__}"))
