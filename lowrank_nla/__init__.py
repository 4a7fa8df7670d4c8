"""lowrank_nla: backend-agnostic randomized low-rank linear algebra.

Every routine accepts NumPy, CuPy, torch or any array-API arrays (or a linear operator with
``shape``, ``dtype`` and ``@``) and returns arrays of the same library, device and dtype.
Importing this package imports neither torch nor CuPy.
"""

from ._bounds import (
    estimate_spectral_norm,
    hmt_error_bound,
    posterior_error_estimate,
    relative_error,
)
from ._eigh import EighResult, nystrom, partial_eigh, randomized_eigh, srevd
from ._sketch import adaptive_range_finder, randomized_range_finder
from ._svd import SVDResult, randomized_svd

__version__ = "0.1.0.dev0"

__all__ = [
    "EighResult",
    "SVDResult",
    "adaptive_range_finder",
    "estimate_spectral_norm",
    "hmt_error_bound",
    "nystrom",
    "partial_eigh",
    "posterior_error_estimate",
    "randomized_eigh",
    "randomized_range_finder",
    "randomized_svd",
    "relative_error",
    "srevd",
]
