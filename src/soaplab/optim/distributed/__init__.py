"""soaplab's optimizers under ``torch.distributed``: who owns what, and how it is put back.

Every parameter gets one owner rank (``ownership``: a pure function of the shapes, balanced by
estimated preconditioner cost); only the owner keeps its state and computes its update, with
the single-process maths. Two ways of putting the result back:

* ``ddp``: pass ``process_group=`` under DDP (every rank holds every parameter); one all-gather
  per param group copies the new values to every rank. A group of one rank, or no
  ``process_group``, gives the plain single-process optimizer.
* ``fsdp``: DTensor parameters (FSDP2's ``fully_shard``, HSDP, tensor parallelism), found
  automatically; one all-to-all gathers each parameter's tiles whole on its owner among all
  the mesh's ranks, another sends every rank its new tile.

``checkpoint`` exports every parameter's state on every rank as DTensor slices (what torch's
checkpoint helpers expect), consolidates it, and checks what is loaded. See
docs/distributed.md, "State layout".
"""

from soaplab.optim.distributed.checkpoint import full_state_dict
from soaplab.optim.distributed.ownership import assign_owners, param_cost, rank_loads

__all__ = ["assign_owners", "full_state_dict", "param_cost", "rank_loads"]

