"""soaplab's optimizers under ``torch.distributed``: who owns what, and how it is put back.

Pass ``process_group=`` (e.g. ``torch.distributed.group.WORLD``) to ``SOAP`` or ``Shampoo``
under DDP: every parameter gets one owner rank (``ownership``: balanced by estimated
preconditioner cost), each rank keeps state for and updates only its own parameters, and one
all-gather per param group copies the new values to every rank (``ddp``). With a group of one
rank, or without ``process_group``, the optimizer is the plain single-process one.
``checkpoint`` consolidates or checks the per-rank state. See docs/distributed.md.
"""

from soaplab.optim.distributed.checkpoint import full_state_dict
from soaplab.optim.distributed.ownership import assign_owners, param_cost, rank_loads

__all__ = ["assign_owners", "full_state_dict", "param_cost", "rank_loads"]

