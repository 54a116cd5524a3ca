"""soaplab: SOAP, Shampoo and gradient-whitening optimizers for PyTorch.

The public surface is small: the optimizer classes, a name registry and parameter roles.
Experiments live in ``soaplab.experiments``, analyses in ``soaplab.analysis``.
"""

from soaplab.optim import SOAP, Shampoo
from soaplab.registry import OPTIMIZERS, optimizer
from soaplab.roles import describe_roles, param_roles

__all__ = ["SOAP", "Shampoo", "optimizer", "OPTIMIZERS", "param_roles", "describe_roles",
           "__version__"]
__version__ = "0.1.0"
