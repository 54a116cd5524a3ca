"""soaplab's optimizers, in three layers that can each be tested alone.

1. ``matrix_functions``: pure functions on batches of symmetric factors (eigenbasis, one
   power-iteration step + QR with the column sort, inverse roots), robust to failure.
2. ``kronecker`` (which axes get a factor, EMA statistics, projections into and out of the
   eigenbasis), ``second_moment`` (Adam's or Adafactor's v), ``grafting``, ``adaptive``
   (which drifted bases to refresh, within a budget) and ``telemetry`` (``refresh_stats``).
3. The torch.optim shells: ``base.KroneckerOptimizer`` (gradient checks, batching of same-shape
   parameters, checkpoints) with ``SOAP`` and ``Shampoo`` on top. The layers under it
   (``state``: dtype policy and checkpoint checks; ``distributed``) see an optimizer only
   through ``interface.Shell`` and never import the shell.

A gradient's walk through ``SOAP.step``: the shell checks every gradient is finite and small
enough for the statistics not to overflow, groups the parameters into buckets of equal factor
plan and stacks their gradients; ``project`` rotates
them into the eigenbasis, Adam's moments update there, ``project_back`` returns the update,
decoupled weight decay follows, then the factors take the gradient's Gram matrices, and every
``precondition_frequency`` steps ``power_qr_step`` refreshes the bases (all of them, or with
``refresh_tolerance`` only those that drifted), permuting v and carrying m into the new basis.
"""

from soaplab.optim.shampoo import Shampoo
from soaplab.optim.soap import SOAP

__all__ = ["SOAP", "Shampoo"]
