"""fastasam: fast, faithful ASAM and SAM for PyTorch.

    opt = fastasam.ASAM(model.parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)
"""

from . import compat, distributed
from .backends import available_backends
from .optim import ASAM, SAM, adaptive_param_groups
from .schedules import RhoFollowsLR
from .utils import frozen_batchnorm_stats
from .variants import BSAM, GSAM, MSAM, WSAM, FriendlySAM, LookSAM

__all__ = [
    "ASAM", "BSAM", "GSAM", "MSAM", "WSAM", "FriendlySAM", "LookSAM", "RhoFollowsLR", "SAM", "adaptive_param_groups",
    "available_backends", "compat", "distributed", "frozen_batchnorm_stats",
]
__version__ = "0.1.0"
