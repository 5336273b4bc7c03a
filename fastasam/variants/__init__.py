"""Cheaper or better sharpness-aware methods than two-pass (A)SAM, one file each:

* :class:`LookSAM` (``looksam.py``): two passes every k-th step, a corrected one-pass step between;
* :class:`GSAM` (``gsam.py``): two passes, the descent along a surrogate-gap-corrected direction;
* :class:`MSAM` (``msam.py``): Momentum-SAM, one pass a step, perturbed along the momentum.

``fastasam.ASAM(..., every=k)`` is interval (A)SAM.
"""

from .gsam import GSAM
from .looksam import LookSAM
from .msam import MSAM

__all__ = ["GSAM", "LookSAM", "MSAM"]
