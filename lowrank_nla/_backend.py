"""Namespace, device and dtype helpers, and the small shim the array API standard lacks.

Every public function of :mod:`lowrank_nla` resolves its input once with :func:`as_operator`
(arrays) or :func:`namespace` (several arrays) and passes the namespace ``xp`` down. What the
standard does not offer lives here and only here:

* seeded Gaussian sketches for every backend (:func:`normal_sampler`);
* eigendecomposition with eigenvalues sorted descending and a float64 retry
  (:func:`eigh_descending`);
* triangular solves and Cholesky with failure detection (:func:`solve_triangular`,
  :func:`cholesky_lower`);
* NaN/Inf guards (:func:`check_finite`) and dtype rules (:func:`floating_dtype`).

Nothing here imports torch or cupy at module import time: a backend is recognised by
``array_api_compat`` (which does not import it either) and imported only once an array of that
library has been seen, at which point it is already in ``sys.modules``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

Array = Any
Namespace = Any
Sampler = Callable[[tuple[int, ...]], Array]


# --------------------------------------------------------------------------- namespaces


def namespace(*arrays: Array, names: tuple[str, ...] | None = None) -> Namespace:
    """Return the array namespace shared by ``arrays`` (mixed libraries raise ``TypeError``)."""
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        libs = sorted({type(a).__module__.split(".")[0] for a in arrays})
        what = ", ".join(f"`{n}`" for n in names) if names else "the array arguments"
        raise TypeError(
            f"{what} must all come from one array library; got arrays from {libs} ({exc})"
        ) from None


def _is_array(obj: Any) -> bool:
    # Operators may define ``__array_namespace__`` too; arrays are the ones with ``ndim``.
    return bool(array_api_compat.is_array_api_obj(obj)) and hasattr(obj, "ndim")


def eps(xp: Namespace, dtype: Any) -> float:
    """Machine epsilon of a real floating ``dtype`` of namespace ``xp``."""
    return float(xp.finfo(dtype).eps)


def floating_dtype(xp: Namespace, x: Array, name: str, *, device: Any = None) -> Any:
    """The dtype computations on ``x`` run in, or ``TypeError`` for unsupported input.

    float32 and float64 are kept; integer input is promoted to the namespace's default real
    floating dtype (on ``device``); boolean, complex, float16 and bfloat16 input is rejected.
    """
    dtype = x.dtype
    if dtype == xp.float32 or (dtype == xp.float64):
        return dtype
    if xp.isdtype(dtype, "bool"):
        raise TypeError(f"`{name}` must have a real floating or integer dtype, got bool")
    if xp.isdtype(dtype, "complex floating"):
        raise TypeError(
            f"`{name}` must have a real floating dtype; complex input is not supported, "
            f"got {dtype}"
        )
    if xp.isdtype(dtype, "integral"):
        info = xp.__array_namespace_info__()
        return info.default_dtypes(device=device)["real floating"]
    raise TypeError(
        f"`{name}` must be float32 or float64 (or integer, promoted to the default float), "
        f"got {dtype}; cast half-precision input to float32 first"
    )


def check_finite(xp: Namespace, x: Array, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds a NaN or an infinity."""
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"`{name}` must not contain NaN or Inf")


def to_numpy(x: Array) -> np.ndarray:
    """Copy an array of any supported library (any device) to a NumPy array on the host."""
    if isinstance(x, np.ndarray | np.generic | float | int):
        return np.asarray(x)
    if isinstance(x, list | tuple):  # e.g. a history of 0-d arrays of any library
        return np.asarray([to_numpy(v) for v in x])
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    xp = array_api_compat.array_namespace(x)
    if array_api_compat.is_array_api_strict_namespace(xp):
        x = x.to_device(xp.Device("CPU_DEVICE"))
    return np.from_dlpack(x)


# --------------------------------------------------------------------------- operators


@dataclass(frozen=True)
class Operator:
    """Internal view of a matrix or linear operator: how to apply it and its transpose.

    ``matmat(X)`` computes ``A @ X`` and ``rmatmat(X)`` computes ``A.T @ X`` (``None`` when
    the operator offers no transpose). ``array`` is the input itself when it is an array.
    """

    shape: tuple[int, int]
    dtype: Any
    xp: Namespace
    device: Any
    matmat: Callable[[Array], Array]
    rmatmat: Callable[[Array], Array] | None
    array: Array | None

    def checked_matmat(self, X: Array, name: str = "A") -> Array:
        """``A @ X``, raising ``ValueError`` if the product holds NaN or Inf.

        For an array this is how the randomized routines validate ``A`` itself: a NaN or
        infinite entry of ``A`` makes its whole row of ``A @ X`` non-finite when ``X`` has
        no zero entries (a Gaussian sketch, with probability one), so no separate pass over
        ``A`` is needed.
        """
        Y = self.matmat(X)
        if not bool(self.xp.all(self.xp.isfinite(Y))):
            if self.array is not None:
                raise ValueError(
                    f"`{name}` must not contain NaN or Inf (found in the product {name} @ X; "
                    "finite entries of huge magnitude can also overflow there)"
                )
            raise ValueError(f"`{name} @ X` must not contain NaN or Inf")
        return Y

    def rmatmat_or_raise(self, name: str) -> Callable[[Array], Array]:
        if self.rmatmat is None:
            raise TypeError(
                f"`{name}` is a linear operator without a transpose: it must expose `.T` "
                "(an operator whose `@` applies the transpose) for this routine"
            )
        return self.rmatmat


def _operator_namespace(op: Any, name: str) -> tuple[Namespace, Any]:
    """Namespace and device of a duck-typed operator (``shape``, ``dtype``, ``@``)."""
    device = getattr(op, "device", None)
    get_ns = getattr(op, "__array_namespace__", None)
    if callable(get_ns):
        # Go through array_api_compat so that NumPy/torch get their compliant wrappers.
        xp = get_ns()
        probe = xp.empty((0,)) if device is None else xp.empty((0,), device=device)
        return array_api_compat.array_namespace(probe), device
    dtype_module = type(op.dtype).__module__.split(".")[0]
    if dtype_module == "torch":
        torch = sys.modules["torch"]
        return array_api_compat.array_namespace(torch.empty(0)), device
    try:
        np_dtype = np.dtype(op.dtype)
    except TypeError:
        np_dtype = None
    if np_dtype is not None:
        return array_api_compat.array_namespace(np.empty(0)), None
    raise TypeError(
        f"cannot tell which array library the operator `{name}` works with: give it an "
        "`__array_namespace__()` method (its dtype is neither a NumPy nor a torch dtype)"
    )


def as_operator(
    A: Any, name: str = "A", *, symmetric: bool = False, check_finite_entries: bool = True
) -> Operator:
    """Validate ``A`` (2-D array or linear operator) and return its :class:`Operator` view.

    Arrays are checked for dimension, dtype (see :func:`floating_dtype`) and finiteness, and
    integer arrays are converted to the default float. With ``check_finite_entries=False``
    the NaN/Inf check of an array is left to the caller, which must then pass its first
    product through :meth:`Operator.checked_matmat`. Operators must expose ``shape`` (two
    positive ints), ``dtype`` and ``@``; their products are checked for NaN/Inf by the
    algorithms. With ``symmetric=True`` the transpose of an operator is the operator itself.
    """
    if _is_array(A):
        xp = array_api_compat.array_namespace(A)
        if A.ndim != 2:
            raise ValueError(f"`{name}` must be a 2-D array, got an array of shape {A.shape}")
        device = array_api_compat.device(A)
        dtype = floating_dtype(xp, A, name, device=device)
        if A.dtype != dtype:
            A = xp.astype(A, dtype)
        m, n = (int(s) for s in A.shape)
        if m == 0 or n == 0:
            raise ValueError(f"`{name}` must not be empty, got shape {A.shape}")
        if check_finite_entries:
            check_finite(xp, A, name)
        arr = A
        return Operator(
            shape=(m, n),
            dtype=dtype,
            xp=xp,
            device=device,
            matmat=lambda X: arr @ X,
            rmatmat=(lambda X: arr @ X) if symmetric else (lambda X: arr.T @ X),
            array=arr,
        )
    shape = getattr(A, "shape", None)
    if shape is None or not hasattr(A, "dtype") or not hasattr(type(A), "__matmul__"):
        raise TypeError(
            f"`{name}` must be a 2-D array (NumPy, CuPy, torch or any array-API array) or a "
            f"linear operator with `shape`, `dtype` and `@`; got {type(A).__name__}"
        )
    if len(shape) != 2 or not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
        raise ValueError(f"`{name}.shape` must be two positive integers, got {shape}")
    xp, device = _operator_namespace(A, name)
    dtype = A.dtype
    if dtype not in (xp.float32, xp.float64):
        raise TypeError(f"`{name}.dtype` must be float32 or float64 for an operator, got {dtype}")
    if symmetric:
        rmatmat: Callable[[Array], Array] | None = lambda X: A @ X  # noqa: E731
    elif hasattr(A, "T"):
        AT = A.T
        rmatmat = lambda X: AT @ X  # noqa: E731
    else:
        rmatmat = None
    return Operator(
        shape=(int(shape[0]), int(shape[1])),
        dtype=dtype,
        xp=xp,
        device=device,
        matmat=lambda X: A @ X,
        rmatmat=rmatmat,
        array=None,
    )


# --------------------------------------------------------------------------- random sketches


def _generator_library(rng: Any) -> str | None:
    """'numpy', 'torch' or 'cupy' for a generator of that library, else ``None``."""
    if isinstance(rng, np.random.Generator):
        return "numpy"
    cls = type(rng)
    module = cls.__module__.split(".")[0]
    if cls.__name__ == "Generator" and module in ("torch", "cupy"):
        return module
    return None


def normal_sampler(xp: Namespace, rng: Any, *, dtype: Any, device: Any) -> Sampler:
    """Return ``draw(shape)`` producing standard Gaussian arrays of ``xp`` on ``device``.

    ``rng`` may be ``None`` (fresh entropy; torch's global generator for torch arrays), an
    ``int`` seed, a :class:`numpy.random.Generator` (drawn on the host and moved to the
    device), a ``torch.Generator`` (torch arrays, same device) or a ``cupy.random.Generator``
    (CuPy arrays). An int seed creates the backend's own generator, so the same seed gives the
    same numbers on the same backend (not across backends). Successive calls of ``draw``
    continue one stream.
    """
    is_torch = array_api_compat.is_torch_namespace(xp)
    is_cupy = array_api_compat.is_cupy_namespace(xp)
    lib = _generator_library(rng)
    if rng is not None and lib is None:
        if isinstance(rng, bool) or not isinstance(rng, int | np.integer):
            raise TypeError(
                "`rng` must be None, an int seed, a numpy.random.Generator, a "
                f"torch.Generator or a cupy.random.Generator, got {type(rng).__name__}"
            )
        if rng < 0:
            raise ValueError(f"`rng` seed must be non-negative, got {rng}")

    if is_torch and (lib == "torch" or rng is None or lib is None):
        torch = sys.modules["torch"]
        if lib == "torch":
            gen = rng
            if torch.device(gen.device).type != torch.device(device).type:
                raise ValueError(
                    f"`rng` is a torch.Generator on {gen.device} but the data is on {device}"
                )
        elif rng is None:
            gen = None
        else:
            gen = torch.Generator(device=device).manual_seed(int(rng))
        return lambda shape: torch.randn(shape, generator=gen, dtype=dtype, device=device)

    if is_cupy and (lib == "cupy" or rng is None or lib is None):
        cupy = sys.modules["cupy"]
        gen = rng if lib == "cupy" else cupy.random.default_rng(None if rng is None else int(rng))

        def draw_cupy(shape: tuple[int, ...]) -> Array:
            with device:
                return gen.standard_normal(shape, dtype=dtype)

        return draw_cupy

    if lib in ("torch", "cupy"):
        raise TypeError(
            f"`rng` is a {lib} generator but the data is not a {lib} array; use an int seed or "
            "a numpy.random.Generator"
        )

    # Host path: NumPy, array_api_strict and any other namespace; numpy generators anywhere.
    gen_np = rng if lib == "numpy" else np.random.default_rng(None if rng is None else int(rng))
    np_dtype = np.float32 if dtype == xp.float32 else np.float64
    if array_api_compat.is_numpy_namespace(xp):
        return lambda shape: gen_np.standard_normal(shape, dtype=np_dtype)
    return lambda shape: xp.asarray(
        gen_np.standard_normal(shape, dtype=np_dtype), dtype=dtype, device=device
    )


# --------------------------------------------------------------------------- dense kernels


def _linalg_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [np.linalg.LinAlgError]
    torch = sys.modules.get("torch")
    if torch is not None:
        errors.append(torch.linalg.LinAlgError)
    return tuple(errors)


def eigh_descending(xp: Namespace, C: Array, *, name: str = "matrix") -> tuple[Array, Array]:
    """Eigenvalues (descending) and eigenvectors of the symmetric matrix ``C``.

    A float32 decomposition that fails or returns NaN/Inf is retried in float64 with a
    ``RuntimeWarning``; a float64 failure raises ``numpy.linalg.LinAlgError``.
    """
    try:
        w, V = xp.linalg.eigh(C)
        ok = bool(xp.all(xp.isfinite(w)))
    except _linalg_errors():
        ok = False
    if not ok:
        if C.dtype == xp.float64:
            raise np.linalg.LinAlgError(f"eigh of the {name} failed to converge in float64")
        warnings.warn(
            f"eigh of the {name} failed in {C.dtype}; retrying in float64",
            RuntimeWarning,
            stacklevel=3,
        )
        w64, V64 = eigh_descending(xp, xp.astype(C, xp.float64), name=name)
        return xp.astype(w64, C.dtype), xp.astype(V64, C.dtype)
    return xp.flip(w, axis=0), xp.flip(V, axis=1)


def cholesky_lower(xp: Namespace, G: Array) -> Array | None:
    """Lower Cholesky factor of the SPD matrix ``G``, or ``None`` when it does not exist.

    Failure is detected both by the backend's exception and by a non-finite or non-positive
    diagonal (some GPU backends return NaN instead of raising).
    """
    try:
        L = xp.linalg.cholesky(G)
    except _linalg_errors():
        return None
    diag = xp.linalg.diagonal(L)
    if not bool(xp.all(xp.isfinite(L))) or not bool(xp.all(diag > 0)):
        return None
    return L


def solve_triangular(xp: Namespace, T: Array, B: Array, *, lower: bool) -> Array:
    """Solve ``T X = B`` for a triangular ``T`` with the backend's triangular solver.

    NumPy uses SciPy, torch ``torch.linalg.solve_triangular``, CuPy ``cupyx.scipy.linalg``;
    other namespaces fall back to the general ``xp.linalg.solve`` (same result, more work).
    """
    if array_api_compat.is_numpy_namespace(xp):
        import scipy.linalg

        return scipy.linalg.solve_triangular(T, B, lower=lower, check_finite=False)
    if array_api_compat.is_torch_namespace(xp):
        torch = sys.modules["torch"]
        return torch.linalg.solve_triangular(T, B, upper=not lower)
    if array_api_compat.is_cupy_namespace(xp):
        import cupyx.scipy.linalg

        return cupyx.scipy.linalg.solve_triangular(T, B, lower=lower)
    return xp.linalg.solve(T, B)


def sign_fix(xp: Namespace, V: Array) -> Array:
    """Signs (+1/-1 per column) making the largest-magnitude entry of each column positive.

    Used to make singular/eigenvectors deterministic across backends; ties go to +1.
    """
    vmax = xp.max(V, axis=0)
    vmin = xp.min(V, axis=0)
    one = xp.ones_like(vmax)
    return xp.where(vmax >= -vmin, one, -one)


def column_scale(xp: Namespace, Y: Array) -> Array:
    """Scale each column of ``Y`` to unit max-norm (keeps the range, prevents overflow)."""
    scale = xp.max(xp.abs(Y), axis=0)
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    return Y / scale
