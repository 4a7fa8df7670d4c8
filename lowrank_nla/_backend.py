"""Namespace, device and dtype helpers, and the small shim the array API standard lacks.

Every public function of :mod:`lowrank_nla` resolves its input once with :func:`as_operator`
(arrays) or :func:`namespace` (several arrays) and passes the namespace ``xp`` down. What the
standard does not offer lives here and only here:

* seeded Gaussian sketches for every backend (:func:`normal_sampler`);
* eigendecomposition with eigenvalues sorted descending and a float64 retry
  (:func:`eigh_descending`);
* triangular solves and Cholesky with failure detection (:func:`solve_triangular`,
  :func:`cholesky_lower`);
* NaN/Inf guards (:func:`check_finite`, :func:`check_factor`), the floating-point
  error-state guard of the public functions (:func:`fp_guarded`), norms that neither
  overflow nor underflow (:func:`safe_norm`) and dtype rules (:func:`floating_dtype`).

Nothing here imports torch or cupy at module import time: a backend is recognised by
``array_api_compat`` (which does not import it either) and imported only once an array of that
library has been seen, at which point it is already in ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import array_api_compat
import numpy as np

Array = Any
Namespace = Any
Sampler = Callable[[tuple[int, ...]], Array]
F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- floating point


def fp_guarded(func: F) -> F:
    """Run ``func`` with NumPy's floating-point warnings for overflow, invalid and divide off.

    Every public function is wrapped: NumPy (and array_api_strict, which computes with NumPy)
    may flag a product that overflows or meets an Inf, and whether it does depends on the BLAS
    kernel of the CPU. Inside the library such products are never trusted blindly: each one
    is checked for NaN/Inf (:meth:`Operator.apply`, :func:`check_factor`, :func:`all_finite`)
    and reported as a ``ValueError`` naming the argument, so the warning would only precede
    the same information, or, with warnings as errors, replace it by a kernel-dependent
    ``RuntimeWarning``. The error state is thread-local and restored on return.

    Once torch is loaded the call also runs under ``torch.no_grad()``: a tensor that
    requires grad is data, not a graph input. The routines read scalars back (norms,
    scales, convergence tests), which torch reports with a ``UserWarning`` on such a
    tensor, and several steps run outside autograd (host LAPACK paths, in-place
    re-orthonormalization), so a recorded graph would give wrong gradients silently;
    results carry no autograd history instead.
    """

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"), _no_autograd():
            return func(*args, **kwargs)

    return cast(F, guarded)


def _no_autograd() -> Any:
    """``torch.no_grad()`` if torch is loaded (never imported here), else a null context."""
    torch = sys.modules.get("torch")
    return contextlib.nullcontext() if torch is None else torch.no_grad()


def all_finite(xp: Namespace, x: Array) -> bool:
    """Whether ``x`` holds no NaN or Inf, in one reduction for the common (finite) case.

    The sum of an array with a NaN or an infinity is never finite (IEEE arithmetic: NaN
    propagates, ``inf + x`` is ``inf`` or NaN), so a finite sum proves every entry finite;
    only when the sum is not finite (a non-finite entry, or finite entries whose sum
    overflows) is the elementwise test run. Half the memory traffic of
    ``all(isfinite(x))`` and no boolean temporary.
    """
    if math.prod(x.shape) == 0:
        return True
    if bool(xp.isfinite(xp.sum(x))):
        return True
    return bool(xp.all(xp.isfinite(x)))


def safe_norm(xp: Namespace, x: Array, axis: int | None = None) -> Array:
    """Euclidean norm of ``x`` (of all entries, or along ``axis``) without overflow/underflow.

    ``max|x| * ||x / max|x| ||``: the squares of entries below ``sqrt(tiny)`` (1e-154 in
    float64, 1e-19 in float32) would underflow to zero and those above ``sqrt(huge)``
    overflow, so the plain ``sqrt(sum x^2)`` misjudges matrices of extreme scale.
    """
    if math.prod(x.shape) == 0:
        shape = () if axis is None else tuple(s for i, s in enumerate(x.shape) if i != axis)
        return xp.zeros(shape, dtype=x.dtype, device=array_api_compat.device(x))
    top = xp.max(xp.abs(x), axis=axis)
    safe = xp.where(top > 0, top, xp.ones_like(top))
    if axis is not None and axis % x.ndim != x.ndim - 1:
        scaled = x / xp.expand_dims(safe, axis=axis)
    elif axis is not None:
        scaled = x / safe[..., None]
    else:
        scaled = x / safe
    return top * xp.linalg.vector_norm(scaled, axis=axis)


def max_abs(xp: Namespace, x: Array) -> float:
    """``max|x|`` as a float (``0.0`` for an empty ``x``), without an ``abs`` temporary."""
    if math.prod(x.shape) == 0:
        return 0.0
    return max(float(xp.max(x)), -float(xp.min(x)))


def power_of_two_scale(xp: Namespace, x: Array, *, gram_rows: int | None = None) -> float:
    """A power of two ``c`` with ``max|x| / c`` in ``[1/2, 2)`` (``1.0`` for a zero ``x``).

    Dividing by ``c`` and multiplying back is exact (no rounding) as long as nothing
    under/overflows, so Gram matrices of ``x / c`` are safe from both at any input scale.
    With ``gram_rows`` (the length of the columns whose inner products will be formed),
    ``1.0`` is returned whenever no scaling is needed: every square of an entry near the
    maximum stays normal and a sum of ``gram_rows`` of them stays finite (then the result
    is bit-identical to the unscaled computation, and the copy is saved).
    """
    top = max_abs(xp, x)
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    if gram_rows is not None:
        info = xp.finfo(x.dtype)
        low = math.sqrt(float(info.smallest_normal)) * 2.0**16
        high = math.sqrt(float(info.max) / (max(gram_rows, 1) * 2.0**16))
        if low <= top <= high:
            return 1.0
    return math.ldexp(1.0, math.frexp(top)[1] - 1)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def overflow_error(subject: str, what: str, dtype: Any) -> ValueError:
    """The ``ValueError`` for a non-finite intermediate computed from finite input."""
    hint = " or compute in float64" if _dtype_name(dtype) == "float32" else ""
    return ValueError(
        f"{subject} is too large for {_dtype_name(dtype)}: the {what} overflowed "
        f"(NaN or Inf from finite input); scale {subject} down{hint}"
    )


def check_factor(xp: Namespace, M: Array, subject: str, what: str) -> None:
    """Raise :func:`overflow_error` unless the small factor ``M`` is finite.

    Called on every small matrix (``l x l`` cores, triangular factors, Gram matrices)
    before it reaches LAPACK, which may loop forever on NaN/Inf; costs one reduction.
    """
    if not all_finite(xp, M):
        raise overflow_error(subject, what, M.dtype)


# --------------------------------------------------------------------------- namespaces


def is_dask_array(obj: Any) -> bool:
    """Whether ``obj`` is a ``dask.array.Array`` (recognised without importing dask)."""
    return bool(array_api_compat.is_dask_array(obj))


def _is_array(obj: Any) -> bool:
    # Operators may define ``__array_namespace__`` too; arrays are the ones with ``ndim``.
    return bool(array_api_compat.is_array_api_obj(obj)) and hasattr(obj, "ndim")


def _is_sparse_tensor(obj: Any) -> bool:
    """A torch tensor with a sparse layout (COO, CSR, ...): usable only through ``@``."""
    layout = getattr(obj, "layout", None)
    return layout is not None and str(layout) != "torch.strided"


def check_array_kind(x: Any, name: str) -> None:
    """Reject array-likes whose data does not mean what their entries say.

    ``numpy.ma.MaskedArray`` (its mask would be silently ignored), ``numpy.matrix`` (its
    ``*``, ``**`` and 1-D indexing differ from arrays, and results could not be returned
    as the same type) and torch ``meta`` tensors (no data at all) raise ``TypeError``.
    """
    if isinstance(x, np.ndarray) and type(x) is not np.ndarray:
        if isinstance(x, np.matrix):
            raise TypeError(
                f"`{name}` is a numpy.matrix, which is not supported (its `*` and indexing "
                f"differ from arrays); pass np.asarray({name})"
            )
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(
                f"`{name}` is a numpy masked array, which is not supported (the mask would "
                f"be ignored); pass {name}.filled(value) or the compressed data"
            )
    if getattr(x, "is_meta", False) is True:
        raise TypeError(f"`{name}` is a torch tensor on the 'meta' device, which holds no data")


def namespace(*arrays: Array, names: tuple[str, ...] | None = None) -> Namespace:
    """Return the array namespace shared by ``arrays``.

    Non-arrays, unsupported array kinds (:func:`check_array_kind`) and mixed libraries raise
    ``TypeError`` naming the arguments (``names``, in the order of ``arrays``).
    """
    labels = names if names is not None and len(names) == len(arrays) else None
    for i, a in enumerate(arrays):
        label = labels[i] if labels else "array argument"
        check_array_kind(a, label)
        if not _is_array(a):
            raise TypeError(
                f"`{label}` must be an array (NumPy, CuPy, torch or any array-API array), "
                f"got {type(a).__name__}"
            )
        if _is_sparse_tensor(a):
            raise TypeError(f"`{label}` must be a dense array, got a torch tensor of {a.layout}")
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        libs = sorted({type(a).__module__.split(".")[0] for a in arrays})
        what = ", ".join(f"`{n}`" for n in names) if names else "the array arguments"
        raise TypeError(
            f"{what} must all come from one array library; got arrays from {libs} ({exc})"
        ) from None


def eps(xp: Namespace, dtype: Any) -> float:
    """Machine epsilon of a real floating ``dtype`` of namespace ``xp``."""
    return float(xp.finfo(dtype).eps)


def floating_dtype(xp: Namespace, x: Array, name: str, *, device: Any = None) -> Any:
    """The dtype computations on ``x`` run in, or ``TypeError`` for unsupported input.

    float32 and float64 are kept; integer input is promoted to the namespace's default real
    floating dtype (on ``device``); boolean, complex, float16 and bfloat16 input is rejected.
    A NumPy dtype in non-native byte order (data read from a big-endian file) stands for
    the same values: its native-order dtype is returned, and the callers' cast converts.
    """
    dtype = x.dtype
    if isinstance(dtype, np.dtype) and not dtype.isnative:
        dtype = dtype.newbyteorder("=")
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
    half = _dtype_name(dtype) in ("float16", "bfloat16")
    raise TypeError(
        f"`{name}` must be float32 or float64 (or integer, promoted to the default float), "
        f"got {dtype}" + ("; cast half-precision input to float32 first" if half else "")
    )


def check_finite(xp: Namespace, x: Array, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds a NaN or an infinity (see :func:`all_finite`)."""
    if not all_finite(xp, x):
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


def host_values(x: Any, name: str) -> np.ndarray:
    """A 1-D float64 NumPy copy of the array-like ``x`` (any library), validated.

    Masked arrays, ``numpy.matrix`` and meta tensors raise ``TypeError``
    (:func:`~lowrank_nla._backend.check_array_kind`), as do non-numeric values. A scalar
    is one value; anything of two or more dimensions raises ``ValueError`` (a matrix passed
    where its spectrum belongs must not be read as a list of values).
    """
    check_array_kind(x, name)
    try:
        values = to_numpy(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"`{name}` must be a 1-D array-like of real numbers ({exc})") from None
    if values.dtype == np.bool_ or not (
        np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    ):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {values.dtype}")
    if values.ndim > 1:
        raise ValueError(f"`{name}` must be 1-D (a vector of values), got shape {values.shape}")
    return values.astype(np.float64).ravel()


# --------------------------------------------------------------------------- operators


@dataclass(frozen=True)
class Operator:
    """Internal view of a matrix or linear operator: how to apply it and its transpose.

    ``matmat(X)`` computes ``A @ X`` and ``rmatmat(X)`` computes ``A.T @ X`` (``None`` when
    the operator offers no transpose), both in ``dtype``. ``array`` is the input itself when
    it is an array. The algorithms use the checked forms :meth:`checked_matmat` and
    :meth:`checked_rmatmat`, so that no NaN or Inf from a product goes unnoticed.
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
        ``A`` is needed. A non-finite product of a finite ``A`` is an overflow and is
        reported as such.
        """
        return self._checked(self.matmat(X), name, f"{name} @ X")

    def checked_rmatmat(self, X: Array, name: str = "A") -> Array:
        """``A.T @ X``, checked like :meth:`checked_matmat`."""
        return self._checked(self.rmatmat_or_raise(name)(X), name, f"{name}.T @ X")

    def _checked(self, Y: Array, name: str, product: str) -> Array:
        if all_finite(self.xp, Y):
            return Y
        if self.array is not None:
            if not all_finite(self.xp, self.array):
                raise ValueError(f"`{name}` must not contain NaN or Inf")
            raise overflow_error(f"`{name}`", f"product {product}", self.dtype)
        raise ValueError(
            f"`{product}` must not contain NaN or Inf: the operator returned NaN or Inf, or "
            f"its output overflowed {_dtype_name(self.dtype)}"
        )

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


def _operator_dtype(xp: Namespace, dtype: Any, name: str, device: Any) -> Any:
    """float32/float64 kept; an integer operator computes in the default float (on ``device``)."""
    if array_api_compat.is_numpy_namespace(xp):
        dtype = np.dtype(dtype).newbyteorder("=")  # same values in native byte order
    if dtype == xp.float32 or dtype == xp.float64:
        return dtype
    try:
        integral = bool(xp.isdtype(dtype, "integral"))
    except (TypeError, ValueError):
        integral = False
    if integral:
        return xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
    raise TypeError(
        f"`{name}.dtype` must be float32, float64 or an integer dtype for an operator, got {dtype}"
    )


def _product(xp: Namespace, Y: Any, shape: tuple[int, int], dtype: Any, product: str) -> Array:
    """The result of an operator's ``@``: a ``shape`` array of the working ``dtype``.

    It must come from the operator's own library (``xp``), hold real or integer values
    (a complex product would lose its imaginary part in the cast) and not be a
    :func:`check_array_kind` reject such as ``numpy.matrix``.
    """
    check_array_kind(Y, product)
    if not _is_array(Y) or tuple(Y.shape) != shape:
        got = f"shape {tuple(Y.shape)}" if hasattr(Y, "shape") else type(Y).__name__
        raise ValueError(f"`{product}` must return an array of shape {shape}, got {got}")
    if array_api_compat.array_namespace(Y) is not xp:
        raise TypeError(
            f"`{product}` must return an array of the operator's library "
            f"({_library_name(xp)}), got {type(Y).__module__}.{type(Y).__name__}"
        )
    if Y.dtype != dtype and not xp.isdtype(Y.dtype, ("real floating", "integral")):
        raise TypeError(f"`{product}` must return real values, got dtype {Y.dtype}")
    return Y if Y.dtype == dtype else xp.astype(Y, dtype)


def _library_name(xp: Namespace) -> str:
    return str(getattr(xp, "__name__", xp)).replace("array_api_compat.", "")


def as_operator(
    A: Any, name: str = "A", *, symmetric: bool = False, check_finite_entries: bool = True
) -> Operator:
    """Validate ``A`` (2-D array or linear operator) and return its :class:`Operator` view.

    Arrays are checked for kind (:func:`check_array_kind`), dimension, dtype (see
    :func:`floating_dtype`) and finiteness, and integer arrays are converted to the default
    float. With ``check_finite_entries=False`` the NaN/Inf check of an array is left to the
    caller, which must then pass its first product through :meth:`Operator.checked_matmat`.
    Operators (and sparse torch tensors, which support little more than ``@``) must expose
    ``shape`` (two positive ints), ``dtype`` (float32, float64 or an integer dtype: the
    products are then computed with blocks of the default float) and ``@``; their products
    are cast to the working dtype, checked for shape here and for NaN/Inf by the
    algorithms. A transpose (``.T``) that fails when applied raises ``TypeError``. With
    ``symmetric=True`` the transpose of an operator is the operator itself. A dask array
    becomes a :class:`~lowrank_nla._dask.DaskOperator` (each product one pass over its
    blocks, results NumPy; its chunks are validated there).
    """
    check_array_kind(A, name)
    if is_dask_array(A):
        from ._dask import dask_operator  # dask is in sys.modules: A is a dask array

        A = dask_operator(A, name)
    if _is_array(A) and not _is_sparse_tensor(A):
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
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or not all(
            isinstance(s, int | np.integer) and not isinstance(s, bool) and s > 0 for s in shape
        )
    ):
        raise ValueError(f"`{name}.shape` must be two positive integers, got {shape}")
    m, n = int(shape[0]), int(shape[1])
    xp, device = _operator_namespace(A, name)
    dtype = _operator_dtype(xp, A.dtype, name, device)

    def matmat(X: Array) -> Array:
        return _product(xp, A @ X, (m, X.shape[1]), dtype, f"{name} @ X")

    rmatmat: Callable[[Array], Array] | None
    if symmetric:
        rmatmat = matmat
    elif _is_sparse_tensor(A) or hasattr(A, "T"):
        # torch's compressed sparse layouts (CSR, CSC, ...) raise NotImplementedError on
        # `.T` (even inside `hasattr`); `.mT` transposes every torch layout.
        AT = A.mT if _is_sparse_tensor(A) else A.T

        def rmatmat(X: Array) -> Array:
            try:
                Y = AT @ X
            except (NotImplementedError, TypeError) as exc:
                raise TypeError(
                    f"`{name}` is a linear operator whose transpose cannot be applied: "
                    f"`{name}.T @ X` raised {type(exc).__name__}({exc}); this routine needs "
                    f"`{name}.T` (for a SciPy LinearOperator: give it `rmatvec`/`rmatmat`)"
                ) from exc
            return _product(xp, Y, (n, X.shape[1]), dtype, f"{name}.T @ X")

    else:
        rmatmat = None
    return Operator(
        shape=(m, n),
        dtype=dtype,
        xp=xp,
        device=device,
        matmat=matmat,
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
    same numbers on the same backend (not across backends), in float32 as in float64 on the
    host and with torch (CuPy draws in the dtype). Successive calls of ``draw`` continue one
    stream.
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
            if int(rng) >= 2**64:  # torch seeds are 64-bit; NumPy's take any size
                raise ValueError(
                    f"`rng` seed must be < 2**64 for torch arrays (a torch.Generator seed "
                    f"has 64 bits), got {rng}"
                )
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
    # Drawn in float64 and cast (as torch.randn and scikit-learn do): one seed gives the
    # same test matrix in float32 and float64, where NumPy's float32 ziggurat would not.
    gen_np = rng if lib == "numpy" else np.random.default_rng(None if rng is None else int(rng))
    np_dtype = np.float32 if dtype == xp.float32 else np.float64

    def draw_host(shape: tuple[int, ...]) -> np.ndarray:
        return gen_np.standard_normal(shape).astype(np_dtype, copy=False)

    if array_api_compat.is_numpy_namespace(xp):
        return draw_host
    return lambda shape: xp.asarray(draw_host(shape), dtype=dtype, device=device)


# --------------------------------------------------------------------------- dense kernels


def _linalg_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [np.linalg.LinAlgError]
    torch = sys.modules.get("torch")
    if torch is not None:
        errors.append(torch.linalg.LinAlgError)
    return tuple(errors)


def eigh_descending(
    xp: Namespace, C: Array, *, name: str = "matrix", subject: str = "`A`"
) -> tuple[Array, Array]:
    """Eigenvalues (descending) and eigenvectors of the symmetric matrix ``C``.

    A non-finite ``C`` (an overflow upstream) raises :func:`overflow_error` naming
    ``subject`` before LAPACK sees it. A float32 decomposition that fails or returns NaN/Inf
    is retried in float64 with a ``RuntimeWarning``; a float64 failure raises
    ``numpy.linalg.LinAlgError``.
    """
    check_factor(xp, C, subject, name)
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
        w64, V64 = eigh_descending(xp, xp.astype(C, xp.float64), name=name, subject=subject)
        return xp.astype(w64, C.dtype), xp.astype(V64, C.dtype)
    return xp.flip(w, axis=0), xp.flip(V, axis=1)


def cholesky_lower(xp: Namespace, G: Array) -> Array | None:
    """Lower Cholesky factor of the SPD matrix ``G``, or ``None`` when it does not exist.

    Failure is detected both by the backend's exception and by a non-finite or non-positive
    diagonal (some GPU backends return NaN instead of raising). A non-finite ``G`` is a
    failure too and never reaches LAPACK.
    """
    if not all_finite(xp, G):
        return None
    try:
        L = xp.linalg.cholesky(G)
    except _linalg_errors():
        return None
    diag = xp.linalg.diagonal(L)
    if not all_finite(xp, L) or not bool(xp.all(diag > 0)):
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
