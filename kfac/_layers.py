"""What a layer measures: the layer registry and the K-FAC conventions of each layer type.

A layer type joins with one :func:`register_layer` entry: its helper turns a call's input and
output gradient into rows and the parameters' gradients into one matrix and back.

Canonical layout (the algorithm reference, docs/algorithms.md, *The K-FAC core*). A layer's
gradient matrix is ``d_G x d_A``: output features by (augmented) input features, the bias
gradient appended as the last column. A Conv2d weight ``(c_out, c_in, k_h, k_w)`` is
flattened row-major to ``c_out x c_in k_h k_w``.

Statistics. A layer sees ``n`` samples (the leading dimension of its input) and ``tau``
positions per sample (1 for a Linear layer on ``(n, d_in)`` inputs; the extra leading
dimensions of a Linear input, or the ``h_out w_out`` output positions of a convolution). With
``a_{i,t}`` the augmented input rows (input patches for Conv2d) and ``g_{i,t}`` the output
gradients of the *batch-mean* loss, the instantaneous factors are (KFC conventions, Grosse and
Martens 2016)::

    A = 1 / (n tau^2) sum_{i,t} a_{i,t} a_{i,t}^T
    G = tau / n      sum_{i,t} (n g_{i,t}) (n g_{i,t})^T

so that ``A (x) G`` carries one factor ``1 / tau``. For ``tau = 1`` these are the K-FAC
factors of Martens and Grosse (2015) with per-sample gradients ``n dL/ds_i``.
"""

from __future__ import annotations

import abc
import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

__all__ = [
    "BatchNorm2dLayer",
    "Conv1dLayer",
    "Conv2dLayer",
    "Layer",
    "LinearLayer",
    "discover",
    "make_layer",
    "register_layer",
    "supported",
]

_REGISTRY: dict[type[nn.Module], type[Layer]] = {}


def register_layer(module_type: type[nn.Module]) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator registering a :class:`Layer` helper for ``module_type`` (and its
    subclasses, unless a subclass has a helper of its own): one entry per layer type, with
    its capture (``input_rows``/``output_rows``) and its gradient layout."""

    def decorate(cls: type[Layer]) -> type[Layer]:
        _REGISTRY[module_type] = cls
        return cls

    return decorate


def _helper(module: nn.Module) -> type[Layer] | None:
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    return None


def supported(module: nn.Module) -> bool:
    """Whether a layer helper is registered for ``module``'s type."""
    return _helper(module) is not None


def make_layer(name: str, module: nn.Module) -> Layer:
    """The registered helper for ``module``; raises for an unsupported configuration."""
    cls = _helper(module)
    if cls is None:
        raise TypeError(f"no layer helper registered for {type(module).__name__}")
    return cls(name, module)


class Layer(abc.ABC):
    """A registered layer: bias handling and the gradient-matrix round trip."""

    module: nn.Module
    name: str
    dim_in: int
    dim_out: int

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        bias = getattr(module, "bias", None)
        # a bias frozen when the layer is registered is not part of the layer: its K-FAC is
        # exactly the bias-free layer's (no column of ones in the input factor)
        self.has_bias = bias is not None and bias.requires_grad

    @property
    def dim_A(self) -> int:
        """Dimension of the input factor: input features (patch size for Conv2d) + bias."""
        return self.dim_in + int(self.has_bias)

    @property
    def dim_G(self) -> int:
        """Dimension of the output-gradient factor."""
        return self.dim_out

    @property
    def params(self) -> list[nn.Parameter]:
        """The preconditioned parameters: the weight, then the bias unless it was frozen at
        registration."""
        weight: nn.Parameter = self.module.weight  # type: ignore[assignment]
        if not self.has_bias:
            return [weight]
        bias: nn.Parameter = self.module.bias  # type: ignore[assignment]
        return [weight, bias]

    def trainable(self) -> bool:
        """Whether the weight trains now (a layer whose weight was frozen after registration
        is left alone: no statistics, no direction, no ``.grad`` written)."""
        return bool(self.params[0].requires_grad)

    def describe(self) -> str:
        return f"'{self.name}' ({type(self.module).__name__})"

    def _augment(self, rows: Tensor) -> Tensor:
        if not self.has_bias:
            return rows
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        return torch.cat([rows, ones], dim=1)

    def has_grad(self) -> bool:
        """Whether the layer has a gradient to precondition: a trainable weight with a
        ``.grad``, or a trainable bias with one."""
        return self.trainable() and any(
            p.grad is not None and p.requires_grad for p in self.params
        )

    def grad_matrix(self, dtype: torch.dtype) -> Tensor:
        """The ``d_G x d_A`` gradient matrix (bias last), in ``dtype``. A missing gradient,
        and the gradient of a bias frozen after registration, count as zero: the bias
        coordinate stays in the factors, it contributes nothing and receives nothing."""
        weight = self.params[0]
        w = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        mat = w.reshape(self.dim_out, self.dim_in).to(dtype)
        if self.has_bias:
            bias = self.params[1]
            b = bias.grad
            if b is None or not bias.requires_grad:
                b = torch.zeros_like(bias)
            mat = torch.cat([mat, b.reshape(-1, 1).to(dtype)], dim=1)
        return mat

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix`: one tensor per parameter, in parameter shape."""
        params = self.params
        parts = [matrix[:, : self.dim_in].reshape(params[0].shape)]
        if self.has_bias:
            parts.append(matrix[:, self.dim_in].reshape(params[1].shape))
        return parts

    def write_grad(
        self, matrix: Tensor, scale: Tensor | None = None, ok: Tensor | None = None
    ) -> None:
        """Replace the trainable parameters' ``.grad`` by the blocks of ``matrix`` times the
        0-d ``scale`` if given (cast to their dtype); a frozen parameter is never given a
        gradient. With ``ok`` (a 0-d bool on the device) a ``.grad`` is replaced only if
        ``ok`` holds and otherwise left as it was (a missing one becomes zeros), selected on
        the device: nothing is read back, and an existing ``.grad`` of ``matrix``'s dtype is
        overwritten in place, without a temporary of its size."""
        # the in-place path multiplies what it selected: by 1 where the gradient stays
        kept = None if ok is None or scale is None else torch.where(ok, scale, 1.0)
        for p, part in zip(self.params, self.split(matrix), strict=True):
            if not p.requires_grad:
                continue
            if ok is not None and p.grad is not None and p.grad.dtype == part.dtype:
                torch.where(ok, part, p.grad, out=p.grad)
                if kept is not None:
                    p.grad.mul_(kept)
                continue
            if scale is not None:
                part = part * scale
            if ok is not None:
                part = torch.where(ok, part, torch.zeros_like(part) if p.grad is None else p.grad)
            if p.grad is None:
                p.grad = part.to(p.dtype).clone()
            else:
                p.grad.copy_(part)

    @abc.abstractmethod
    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Augmented input rows ``(n tau, d_A)`` of one call and its number of samples ``n``."""

    @abc.abstractmethod
    def output_rows(self, g: Tensor) -> Tensor:
        """Output-gradient rows ``(n tau, d_G)`` of one call."""


@register_layer(nn.Linear)
class LinearLayer(Layer):
    """``nn.Linear``: inputs ``(n, ..., d_in)``; extra leading dimensions are positions."""

    def __init__(self, name: str, module: nn.Linear) -> None:
        super().__init__(name, module)
        self.dim_in = module.in_features
        self.dim_out = module.out_features

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Augmented input rows ``(n tau, d_A)`` and the number of samples ``n``."""
        n = x.shape[0] if x.ndim > 1 else 1
        return self._augment(x.reshape(-1, self.dim_in)), n

    def output_rows(self, g: Tensor) -> Tensor:
        """Output-gradient rows ``(n tau, d_G)``."""
        return g.reshape(-1, self.dim_out)


@register_layer(nn.Conv2d)
class Conv2dLayer(Layer):
    """``nn.Conv2d`` with ``groups == 1`` and zero padding (stride, padding, dilation any)."""

    def __init__(self, name: str, module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise ValueError(
                f"Unsupported layer '{name}': Conv2d with groups={module.groups}; K-FAC "
                "supports groups=1 only (skip it with `skip_layers`)"
            )
        if module.padding_mode != "zeros":
            raise ValueError(
                f"Unsupported layer '{name}': Conv2d with padding_mode="
                f"{module.padding_mode!r}; only 'zeros' is supported (skip it with `skip_layers`)"
            )
        super().__init__(name, module)
        self.kernel_size = tuple(module.kernel_size)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.padding = self._padding(name, module)
        self.dim_in = module.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.dim_out = module.out_channels

    def _padding(self, name: str, module: nn.Conv2d) -> tuple[int, int]:
        if not isinstance(module.padding, str):
            return (int(module.padding[0]), int(module.padding[1]))
        if module.padding == "valid":
            return (0, 0)
        # padding="same": torch pads (total // 2) before and the rest after; unfold pads
        # symmetrically, so only an even total padding can be represented.
        totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            raise ValueError(
                f"Unsupported layer '{name}': Conv2d padding='same' with an asymmetric total "
                f"padding {totals}; use an odd kernel size or explicit padding"
            )
        return (totals[0] // 2, totals[1] // 2)

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Augmented input patches ``(n h_out w_out, c_in k_h k_w [+1])`` and ``n``."""
        if x.ndim == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(
            x,
            kernel_size=self.kernel_size,
            dilation=self.dilation,
            padding=self.padding,
            stride=self.stride,
        )  # (n, c_in k_h k_w, L): the row-major flattening of the weight
        rows = patches.transpose(1, 2).reshape(-1, self.dim_in)
        return self._augment(rows), x.shape[0]

    def output_rows(self, g: Tensor) -> Tensor:
        """Output-gradient rows ``(n h_out w_out, c_out)``."""
        if g.ndim == 3:
            g = g.unsqueeze(0)
        return g.permute(0, 2, 3, 1).reshape(-1, self.dim_out)


#: Layer types with a weight K-FAC would act on but no helper here: rejected at registration
#: (a silent omission would leave the user believing they are preconditioned).
class BatchNorm2dLayer(Layer):
    """``nn.BatchNorm2d`` (affine), for the per-sample methods only (SENG): not in the layer
    registry, a block accepts it through its ``extra_layers`` (the K-FAC family has no
    Kronecker factors for it).

    Gradient matrix ``C x 2``: the weight ``gamma`` as one column, the bias ``beta`` as the
    second (when trainable). The rows are channel-wise (``diagonal``): input rows
    ``xhat_{i,t}`` ``(n tau, C)``, the input normalised with the statistics the forward used
    (the batch's in training mode, recomputed here without touching the running averages),
    and output-gradient rows ``g_{i,t}`` ``(n tau, C)`` over the ``tau = h w`` positions, so
    that sample ``i``'s gradient is ``n sum_t [g_{i,t} * xhat_{i,t}, g_{i,t}]`` (elementwise
    products per channel; :func:`kfac._persample.diagonal_explicit`).
    """

    #: Channel-wise rows: the per-sample gradient is not a sum of outer products of the rows.
    diagonal = True

    def __init__(self, name: str, module: nn.BatchNorm2d) -> None:
        super().__init__(name, module)
        self.dim_in = 1
        self.dim_out = module.num_features

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """The normalised input ``xhat`` as rows ``(n h w, C)`` and ``n``."""
        module = self.module
        assert isinstance(module, nn.BatchNorm2d)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if module.training or module.running_mean is None:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        else:
            assert module.running_var is not None
            mean, var = module.running_mean.to(x.dtype), module.running_var.to(x.dtype)
        xhat = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + module.eps)
        return xhat.permute(0, 2, 3, 1).reshape(-1, self.dim_out), x.shape[0]

    def output_rows(self, g: Tensor) -> Tensor:
        """Output-gradient rows ``(n h w, C)``."""
        return g.permute(0, 2, 3, 1).reshape(-1, self.dim_out)


_REJECTED: tuple[type[nn.Module], ...] = (
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Bilinear,
)


@register_layer(nn.Conv1d)
class Conv1dLayer(Conv2dLayer):
    """``nn.Conv1d`` with ``groups == 1`` and zero padding: a Conv2d of height 1 (weight
    ``(c_out, c_in, k)`` flattened to ``c_out x c_in k``)."""

    def __init__(self, name: str, module: nn.Conv1d) -> None:
        Layer.__init__(self, name, module)
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(
                f"Unsupported layer '{name}': Conv1d with groups={module.groups}, "
                f"padding_mode={module.padding_mode!r}; K-FAC supports groups=1 and zero "
                "padding (skip it with `skip_layers`)"
            )
        self.kernel_size = (1, int(module.kernel_size[0]))
        self.stride = (1, int(module.stride[0]))
        self.dilation = (1, int(module.dilation[0]))
        if isinstance(module.padding, str):
            total = (
                0 if module.padding == "valid" else self.dilation[1] * (self.kernel_size[1] - 1)
            )
            if total % 2:
                raise ValueError(
                    f"Unsupported layer '{name}': Conv1d padding='same' with an asymmetric "
                    f"total padding {total}; use an odd kernel size or explicit padding"
                )
            self.padding = (0, total // 2)
        else:
            self.padding = (0, int(module.padding[0]))
        self.dim_in = module.in_channels * self.kernel_size[1]
        self.dim_out = module.out_channels

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Augmented input patches ``(n l_out, c_in k [+1])`` and ``n``."""
        if x.ndim == 2:
            x = x.unsqueeze(0)
        return super().input_rows(x.unsqueeze(2))

    def output_rows(self, g: Tensor) -> Tensor:
        """Output-gradient rows ``(n l_out, c_out)``."""
        if g.ndim == 2:
            g = g.unsqueeze(0)
        return super().output_rows(g.unsqueeze(2))


def _parse_skip(model: nn.Module, skip_layers: Any) -> tuple[list[str], list[type]]:
    if isinstance(skip_layers, (str, type)):
        skip_layers = [skip_layers]
    patterns: list[str] = []
    types: list[type] = []
    for item in skip_layers:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise ValueError(
                f"Invalid skip_layers entry: {item!r} (must be a name pattern or an nn.Module "
                "subclass)"
            )
    names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"Invalid skip_layers entry: pattern {pattern!r} matches no module")
    return patterns, types


def _check_registrable(name: str, module: nn.Module) -> None:
    """Reject, with what to do, a layer whose weight K-FAC cannot describe."""
    skip = f"exclude it with skip_layers=['{name}']"
    if parametrize.is_parametrized(module):
        raise ValueError(
            f"Unsupported layer '{name}' ({type(module).__name__}): its weight is computed by "
            "a parametrization (torch.nn.utils.parametrize, parametrizations.weight_norm or "
            "spectral_norm); the K-FAC factors describe the computed weight, not the "
            f"parameters that train; {skip}"
        )
    for attr in ("weight", "bias"):
        value = getattr(module, attr, None)
        if isinstance(value, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"Unsupported layer '{name}' ({type(module).__name__}): its {attr} is not "
                "initialized yet (a lazy module); run one forward pass before building the "
                f"optimizer, or {skip}"
            )
        if value is not None and not isinstance(value, nn.Parameter):
            raise ValueError(
                f"Unsupported layer '{name}' ({type(module).__name__}): its {attr} is a "
                "computed tensor, not a Parameter (torch.nn.utils.weight_norm or "
                f"spectral_norm?); {skip}"
            )
        if value is not None and (value.is_complex() or not value.is_floating_point()):
            raise ValueError(
                f"Unsupported layer '{name}' ({type(module).__name__}): its {attr} is "
                f"{value.dtype}; K-FAC's factors are real (a complex weight would lose its "
                f"imaginary part); {skip}"
            )


def _check_shared(
    model: nn.Module, layers: dict[str, Layer], skipped: Callable[[str, nn.Module], bool]
) -> None:
    """Reject a registered layer's parameter that another module also holds (tied or shared
    weights), unless ``skip_layers`` excludes that other module: the gradient sums the
    contributions of every use, one layer's factors describe one use only, and two
    directions would be written to one ``.grad``."""
    holders: dict[int, list[str]] = {}
    # one name per module object: a module applied several times is one layer (its calls
    # are weight sharing inside the forward, which the statistics handle)
    for mod_name, module in model.named_modules():
        if skipped(mod_name, module):
            continue
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append(mod_name)
    for name, layer in layers.items():
        owner = getattr(layer, "owner", name)
        for param in layer.params:
            others = [m for m in holders.get(id(param), []) if m != owner]
            if others:
                users = ", ".join(f"'{m}'" for m in [name, *others])
                raise ValueError(
                    f"Unsupported shared parameter: a parameter of layer '{name}' is also held "
                    f"by {', '.join(repr(m) for m in others)} (tied or shared weights, used by "
                    f"{users}); K-FAC's factors describe one use of a weight: precondition at "
                    "most one holder and name the others in `skip_layers` (their uses then "
                    "count only through the gradient), or untie the weights"
                )


def discover(
    model: nn.Module, skip_layers: Any, extra: Mapping[type[nn.Module], type[Layer]] | None = None
) -> dict[str, Layer]:
    """The registered layers of ``model`` with a trainable weight, in model order, minus
    ``skip_layers`` (``fnmatch`` patterns on qualified names, or module types). ``extra``
    maps further module types to their helpers (a block's ``extra_layers``: SENG's
    ``BatchNorm2d``); a module of such a type joins when it has a trainable weight.

    Raises ``ValueError`` for a layer K-FAC cannot describe unless it is skipped: a
    parametrized or computed weight (``weight_norm``, ``spectral_norm``, ``parametrize``), a
    complex weight, an uninitialized lazy layer, a parameter shared with another module, or a
    layer type with a weight but no helper (transposed and 3-d convolutions, ``nn.Bilinear``)."""
    patterns, types = _parse_skip(model, skip_layers)

    def skipped(name: str, module: nn.Module) -> bool:
        return isinstance(module, tuple(types)) or any(
            fnmatch.fnmatchcase(name, pattern) for pattern in patterns
        )

    from ._attention import attention_layers

    layers: dict[str, Layer] = {}
    inside_skipped: list[str] = []
    for name, module in model.named_modules():
        if skipped(name, module) or any(name.startswith(f"{s}.") for s in inside_skipped):
            if isinstance(module, nn.MultiheadAttention):
                inside_skipped.append(name)  # its out_proj is skipped with it
            continue
        if isinstance(module, nn.MultiheadAttention):
            weights = [p for p in module.parameters(recurse=False) if p.ndim == 2]
            if not all(p.requires_grad for p in weights):
                # frozen projections: torch's own forward, and out_proj (whose hooks would
                # never fire inside it) is left out with them
                inside_skipped.append(name)
                continue
            layers.update(attention_layers(name, module))
            continue
        helper = next((h for t, h in (extra or {}).items() if isinstance(module, t)), None)
        if helper is not None:
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.requires_grad:
                _check_registrable(name, module)
                layers[name] = helper(name, module)
            continue
        if isinstance(module, _REJECTED):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                raise ValueError(
                    f"Unsupported layer '{name}' ({type(module).__name__}): no K-FAC layer "
                    f"helper for this type; exclude it with skip_layers=['{name}'] or "
                    f"skip_layers=[nn.{type(module).__name__}] (its parameters then take the "
                    "base optimizer's plain update)"
                )
            continue
        if not supported(module):
            continue
        _check_registrable(name, module)
        if not module.weight.requires_grad:
            continue
        layers[name] = make_layer(name, module)
    _check_shared(model, layers, skipped)
    return layers
