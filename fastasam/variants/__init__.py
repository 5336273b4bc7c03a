"""Cheaper or better sharpness-aware methods than two-pass (A)SAM, one file each:

* :class:`LookSAM` (``looksam.py``): two passes every k-th step, a corrected one-pass step between;
* :class:`GSAM` (``gsam.py``): two passes, the descent along a surrogate-gap-corrected direction;
* :class:`MSAM` (``msam.py``): Momentum-SAM, one pass a step, perturbed along the momentum;
* :class:`FriendlySAM` (``friendly.py``): two passes, the ascent along the gradient minus its moving average;
* :class:`WSAM` (``wsam.py``): two passes, the sharpness as a weighted regularizer;
* :class:`BSAM` (``bsam.py``): Bayesian SAM, an optimizer of its own (no base optimizer), noise and an Adam-like
  update of the mean and precision.

``fastasam.ASAM(..., every=k)`` is interval (A)SAM.
"""

from .bsam import BSAM
from .friendly import FriendlySAM
from .gsam import GSAM
from .looksam import LookSAM
from .msam import MSAM
from .wsam import WSAM

__all__ = ["BSAM", "GSAM", "MSAM", "WSAM", "FriendlySAM", "LookSAM"]
