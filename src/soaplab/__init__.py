"""soaplab: SOAP, Shampoo and gradient-whitening optimizers for PyTorch.

The public surface is small: the optimizer classes and a name registry.
Experiments live in ``soaplab.experiments``, analyses in ``soaplab.analysis``.
"""

from soaplab.optim import SOAP, Shampoo
from soaplab.registry import OPTIMIZERS, optimizer

__all__ = ["SOAP", "Shampoo", "optimizer", "OPTIMIZERS", "__version__"]
__version__ = "0.1.0"
