"""lowrank_nla: backend-agnostic randomized low-rank linear algebra.

Every routine accepts NumPy, CuPy, torch or any array-API arrays (or a linear operator with
``shape``, ``dtype`` and ``@``) and returns arrays of the same library, device and dtype.
Importing this package imports neither torch nor CuPy.
"""

from ._bounds import (
    brand_drift_bound,
    ea_decay_modes,
    estimate_spectral_norm,
    hmt_error_bound,
    inverse_perturbation_bound,
    krylov_error_bound,
    posterior_error_estimate,
    relative_error,
)
from ._brand import BrandUpdate, brand_update, rayleigh_ritz_refresh, svd_update
from ._eigh import EighResult, nystrom, partial_eigh, randomized_eigh, srevd
from ._kernels import (
    DampedInverse,
    KronEigenbasisInverse,
    damped_inverse,
    kron_eigenbasis_inverse,
)
from ._lowrank import LowRankPSD
from ._rank import RankController, RankState, truncation_ratio
from ._sketch import adaptive_range_finder, randomized_range_finder
from ._svd import SVDResult, randomized_svd
from ._woodbury import (
    damped_inverse_apply,
    kron_inverse_apply,
    kron_inverse_apply_factored,
    smw_coefficients,
    woodbury_solve,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "BrandUpdate",
    "DampedInverse",
    "EighResult",
    "KronEigenbasisInverse",
    "LowRankPSD",
    "RankController",
    "RankState",
    "SVDResult",
    "adaptive_range_finder",
    "brand_drift_bound",
    "brand_update",
    "damped_inverse",
    "damped_inverse_apply",
    "ea_decay_modes",
    "estimate_spectral_norm",
    "hmt_error_bound",
    "inverse_perturbation_bound",
    "kron_eigenbasis_inverse",
    "kron_inverse_apply",
    "kron_inverse_apply_factored",
    "krylov_error_bound",
    "nystrom",
    "partial_eigh",
    "posterior_error_estimate",
    "randomized_eigh",
    "randomized_range_finder",
    "randomized_svd",
    "rayleigh_ritz_refresh",
    "relative_error",
    "smw_coefficients",
    "srevd",
    "svd_update",
    "truncation_ratio",
    "woodbury_solve",
]
