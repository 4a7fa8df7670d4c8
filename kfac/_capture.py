"""Hooks that record layer inputs and output gradients as each block's capture spec asks.

The engine arms the capture before each step with one :class:`~kfac._curvature.CaptureSpec`
per layer (or none): what the forwards of that step must record. Inputs are reduced to the
sum of outer products ``sum a a^T`` inside the forward hook (no activation is kept alive
until ``step()``) unless the spec asks for the rows (``O(n D)``, for online updates and for
directions computed from the rows). A layer with no spec records nothing, and nothing is
recorded under ``torch.no_grad()`` or in eval mode (``module.training`` false).

Accumulation. Everything recorded between two ``step()`` calls counts (docs/kfac.md,
*Training loops*):

* **micro-batches**: a forward of a layer after its output gradients arrived starts a new
  micro-batch; the samples ``n`` of the micro-batches add up. With the loss of each of ``k``
  micro-batches divided by ``k`` (the usual ``loss / k``), the statistics equal those of one
  backward over the concatenated batch;
* **several calls inside one forward/backward** (two views, a siamese pair, a module applied
  twice) share the weight: like positions of a sequence (the *expand* setting of Eschenhagen
  et al., 2023), each call adds rows for the same ``n`` samples, so ``tau`` counts rows per
  sample over all calls.

A forward recorded with no backward before ``step()`` is an error naming the layer when
other calls of the layer got their output gradient (an evaluation forward in training mode
with gradients enabled, most often); a layer none of whose calls got one (an output the
step's loss left out) records nothing.

Output gradients are captured with a *tensor* hook registered on the layer's output in the
forward hook: unlike ``register_full_backward_hook`` it keeps working when an in-place
operation (``nn.ReLU(inplace=True)``) modifies the output afterwards, because a tensor hook
registered before an in-place change receives the gradient of the value it was registered on.

The model outlives the optimizers built on it, so its hooks hold the capture weakly
(:class:`WeakHook`): an optimizer dropped by its owner is collected, and its hooks are removed
then (as by :meth:`Capture.remove`); until then they do nothing. A deepcopy or a pickle of the
model (``torch.save(model)``) carries hooks that do nothing: the copy is not preconditioned.

Monte-Carlo Fisher (``fisher="mc"``): a forward hook on the model samples targets from the
model's predictive distribution and runs one extra backward (``torch.autograd.grad`` with
``retain_graph=True``, so the caller's backward still works and no ``.grad`` is touched); the
output tensor hooks record only during that pass.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from ._attention import restore
from ._curvature import CaptureSpec, LayerBatch

__all__ = ["LOSSES", "Capture", "WeakHook", "sampled_loss"]

LOSSES = ("cross_entropy", "mse")


def sampled_loss(
    output: Tensor, loss: str, generator: torch.Generator, samples: int | None = None
) -> Tensor:
    """The batch-mean loss of ``output`` against targets drawn from the model's distribution.

    ``"cross_entropy"``: ``y ~ Categorical(softmax(output, dim=1))`` and
    ``F.cross_entropy(output, y)``. ``"mse"``: ``F.mse_loss(output, y)`` with
    ``y ~ N(output, k/2 I)``, ``k`` the number of output entries per sample, the Gaussian whose
    negative log-likelihood ``||f - y||^2 / k`` is this per-sample loss; the expected outer
    product of the sampled gradients is then the generalized Gauss-Newton matrix of the loss.
    A 1-D output is one entry per sample when it has ``samples`` entries (the samples the
    layers saw: a regression output squeezed to ``(n,)``), else one sample's entries.
    """
    logits = output.detach().float()
    if loss == "cross_entropy":
        if output.ndim < 2:
            raise ValueError(
                f"fisher='mc' with loss='cross_entropy' needs logits of shape (n, C, ...), got "
                f"{tuple(output.shape)}"
            )
        probs = torch.softmax(logits, dim=1).movedim(1, -1)
        flat = probs.reshape(-1, probs.shape[-1])
        # a non-finite output (a NaN in the batch) draws from the uniform distribution: its
        # sampled loss and statistics are non-finite, which the step's checks then skip
        flat = torch.where(torch.isfinite(flat).all(dim=1, keepdim=True), flat, 1.0)
        labels = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
        return F.cross_entropy(output, labels)
    if output.ndim > 1:
        per_sample = output[0].numel()
    elif samples is not None and output.shape[0] == samples:
        per_sample = 1
    else:
        per_sample = output.numel()
    noise = torch.randn(
        logits.shape, generator=generator, device=logits.device, dtype=logits.dtype
    )
    target = logits + math.sqrt(per_sample / 2.0) * noise
    return F.mse_loss(output, target.to(output.dtype))


def _full_precision(t: Tensor) -> Any:
    """Statistics are products in the statistics dtype, never autocast to half precision."""
    return torch.autocast(t.device.type, enabled=False)


def _exact(t: Any) -> bool:
    """Whether ``t`` is a float32/float64 tensor (not a half-precision autocast result)."""
    return isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float64)


@dataclass
class Record:
    """What one layer saw since the last step (sums in the statistics dtype).

    Calls are numbered in forward order. A call made during a backward pass (an activation
    checkpoint's recomputation) is *pending* until its output gradient arrives: a
    non-reentrant checkpoint's recomputation never gets one and is dropped, a reentrant
    one's does and counts. ``outside`` holds the calls made outside a backward, each of
    which must get a gradient before ``step()``."""

    a_sum: Tensor | None = None
    a_blocks: dict[int, Tensor] = field(default_factory=dict)
    g_blocks: dict[int, Tensor] = field(default_factory=dict)
    pending: dict[int, tuple[Tensor, int, int, bool]] = field(default_factory=dict)
    a_rows: int = 0
    n: int = 0
    call_n: int | None = None
    calls: int = 0
    outside: set[int] = field(default_factory=set)
    grads: set[int] = field(default_factory=set)
    fresh_grad: bool = False
    g_sum: Tensor | None = None
    g_rows: int = 0
    half: bool = False
    handles: list[Any] = field(default_factory=list)


class WeakHook:
    """A module hook that calls ``getattr(owner, method)(*args, module, ...)`` through a weak
    reference to ``owner``: it does nothing once ``owner`` is gone.

    Copied (``copy.deepcopy`` of the model) or pickled (``torch.save(model)``), it becomes a
    hook that does nothing, since the copy's modules are not the ones ``owner`` hooked.
    """

    def __init__(self, owner: Any, method: str, *args: Any) -> None:
        self._owner = None if owner is None else weakref.ref(owner)
        self._method = method
        self._args = args

    def __call__(self, *hook_args: Any) -> Any:
        owner = None if self._owner is None else self._owner()
        if owner is None:
            return None
        return getattr(owner, self._method)(*self._args, *hook_args)

    def __reduce__(self) -> tuple[Any, ...]:
        return (WeakHook, (None, self._method))


def _detach(handles: list[RemovableHandle], owners: list[nn.Module]) -> None:
    """Remove ``handles`` and give the attention modules ``owners`` their own forward."""
    for handle in handles:
        handle.remove()
    handles.clear()
    for owner in owners:
        restore(owner)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now (a checkpoint recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class Capture:
    """Forward/tensor hooks on the registered layers and, for the MC Fisher, on the model.

    Parameters
    ----------
    model : nn.Module
        The model (a forward hook on it runs the Monte-Carlo pass of ``fisher="mc"``).
    layers : mapping of name to layer helper
        The registered layers (``kfac._layers``).
    dtype : torch.dtype
        Statistics dtype (float32 or float64), independent of the model dtype.
    fisher : {"empirical", "mc"}
    loss : {"cross_entropy", "mse"} or None
        Required for ``fisher="mc"``.
    generator : torch.Generator or None
        Source of the MC targets.
    grad_scale : callable () -> float
        The current ``GradScaler`` scale (1 without a scaler): captured gradients are divided
        by it.

    Attributes
    ----------
    plan : dict of str to CaptureSpec
        What each layer records on the coming step (:meth:`arm`); absent layers record
        nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, Any],
        *,
        dtype: torch.dtype,
        fisher: str,
        loss: str | None,
        generator: torch.Generator | None,
        grad_scale: Callable[[], float],
    ) -> None:
        self.layers = dict(layers)
        self.dtype = dtype
        self.fisher = fisher
        self.loss = loss
        self.generator = generator
        self.grad_scale = grad_scale
        self.records: dict[str, Record] = {name: Record() for name in self.layers}
        self.plan: dict[str, CaptureSpec] = {}
        self._statistics = False
        self._mc_pass = False
        self._handles: list[RemovableHandle] = []
        for name, layer in self.layers.items():
            hook = WeakHook(self, "_on_forward", name)
            self._handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        if fisher == "mc":
            self._handles.append(model.register_forward_hook(WeakHook(self, "_on_model_output")))
        owners = {
            id(owner): owner
            for layer in self.layers.values()
            if (owner := getattr(layer, "owner_module", None)) is not None
        }
        # the hooks go when the capture does (its optimizer was dropped)
        self._detach = weakref.finalize(self, _detach, self._handles, list(owners.values()))

    def arm(self, plan: Mapping[str, CaptureSpec], *, statistics: bool) -> None:
        """Set what each layer records on the coming step; ``statistics`` says whether the
        step is a factor-update step (the Monte-Carlo pass runs only then)."""
        self.plan = dict(plan)
        self._statistics = statistics

    def remove(self) -> None:
        """Remove every hook (and give attention modules back their own forward)."""
        self._detach()
        self.reset()

    def reset(self) -> None:
        """Forget what was recorded (the start of a new step)."""
        for record in self.records.values():
            for handle in record.handles:
                handle.remove()
        self.records = {name: Record() for name in self.layers}

    def _recording(self, name: str) -> bool:
        layer = self.layers[name]
        return torch.is_grad_enabled() and layer.module.training and name in self.plan

    def _on_forward(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        """The forward hook of layer ``name`` (its input given by position or by keyword,
        ``layer(input=x)``)."""
        layer = self.layers[name]
        if not self._recording(name) or not isinstance(output, Tensor):
            return
        args = args or tuple(kwargs.values())
        if not args or not isinstance(args[0], Tensor):
            return
        if not output.requires_grad or not layer.trainable():
            return
        record = self.records[name]
        keep = self.plan[name].rows
        half = not (_exact(args[0]) and _exact(output))
        with torch.no_grad(), _full_precision(output):
            rows, n = layer.input_rows(args[0].detach())
            rows = rows.to(self.dtype).clone() if keep else rows.to(self.dtype)
            value = rows if keep else rows.T @ rows
        call = record.calls
        record.calls += 1
        count = rows.shape[0]
        if _in_backward():
            record.pending[call] = (value, count, n, half)
        else:
            record.outside.add(call)
            self._commit(name, call, value, count, n, half)
        record.handles.append(output.register_hook(self._grad_hook(name, call, n)))

    def _commit(self, name: str, call: int, value: Tensor, count: int, n: int, half: bool) -> None:
        """Count one call's inputs (``count`` rows of ``n`` samples, or their outer product)
        in the step's statistics."""
        record = self.records[name]
        if record.call_n is None or record.fresh_grad:
            # the first call, or a forward after this layer's gradients arrived: a new
            # micro-batch, whose samples add to the step's
            record.n += n
            record.call_n = n
            record.fresh_grad = False
        elif record.call_n != n:
            raise RuntimeError(
                f"layer {self.layers[name].describe()} was called with {n} samples after "
                f"{record.call_n} in one forward/backward; calls that share a backward share "
                "the weight over the same samples (views, positions), so they must have the "
                "same batch size"
            )
        record.half |= half
        record.a_rows += count
        if self.plan[name].rows:
            record.a_blocks[call] = value
        else:
            record.a_sum = value if record.a_sum is None else record.a_sum + value

    def _grad_hook(self, name: str, call: int, n: int) -> Callable[[Tensor], None]:
        layer = self.layers[name]

        def hook(grad: Tensor) -> None:
            if (self.fisher == "mc") != self._mc_pass or name not in self.plan:
                return
            record = self.records[name]
            if call in record.pending:
                self._commit(name, call, *record.pending.pop(call))
            keep = self.plan[name].rows
            with torch.no_grad(), _full_precision(grad):
                rows = layer.output_rows(grad.detach()).to(self.dtype)
                scale = self.grad_scale()
                if self._mc_pass and n:
                    # the sampled loss is a mean over this micro-batch's n samples: keep
                    # per-sample gradients, divided by the step's samples in batch()
                    scale /= n
                if scale != 1.0:
                    rows = rows / scale
                outer = None if keep else rows.T @ rows
            if outer is None:
                earlier = record.g_blocks.get(call)
                # two backwards through one call (retain_graph) sum into one gradient
                record.g_blocks[call] = rows.clone() if earlier is None else earlier + rows
            else:
                record.g_sum = outer if record.g_sum is None else record.g_sum + outer
            if call not in record.grads:
                record.g_rows += rows.shape[0]
            record.grads.add(call)
            record.fresh_grad = True

        return hook

    def _on_model_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (torch.is_grad_enabled() and module.training and self._statistics and self.plan):
            return
        if not isinstance(output, Tensor):
            raise TypeError(
                "fisher='mc' needs the model to return one tensor (the logits or predictions), "
                f"got {type(output).__name__}"
            )
        if not output.requires_grad:
            return
        assert self.loss is not None
        assert self.generator is not None
        weights = [layer.params[0] for layer in self.layers.values() if layer.trainable()]
        # the samples of this forward, as the layers' calls counted them
        samples = next((r.call_n for r in self.records.values() if r.call_n is not None), None)
        loss = sampled_loss(output, self.loss, self.generator, samples) * self.grad_scale()
        self._mc_pass = True
        try:
            torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        finally:
            self._mc_pass = False

    def batch(self, name: str) -> LayerBatch | None:
        """What layer ``name`` recorded since the last step, or ``None`` when it recorded
        nothing (not in the plan, or no training forward with gradients through it, or no
        output gradient for any of its calls: an output this step's loss did not use);
        raises when some calls recorded outside a backward got an output gradient and
        others did not (a forward after the last backward, most often)."""
        record = self.records[name]
        layer = self.layers[name]
        missing = record.outside - record.grads
        if missing and record.grads:
            raise RuntimeError(
                f"layer {layer.describe()} recorded {len(record.outside)} forward call(s) in "
                f"training mode with gradients enabled since the last step, and {len(missing)} "
                "of them got no output gradient before step(): was a forward run after the "
                "last backward() (run evaluation forwards under torch.no_grad() or "
                "model.eval()), was the output detached or unused by the loss, or was the "
                "layer called outside the model's forward?"
            )
        if not record.grads:
            return None
        calls = sorted(record.grads)
        g_sum, g_rows = record.g_sum, None
        if record.g_blocks:
            g_rows = torch.cat([record.g_blocks[call] for call in calls])
        if self.fisher == "mc" and record.n:  # (a batch of no samples has no statistics)
            g_sum = None if g_sum is None else g_sum / record.n**2
            g_rows = None if g_rows is None else g_rows / record.n
        return LayerBatch(
            n=record.n,
            positions=record.a_rows,
            a_sum=record.a_sum,
            g_sum=g_sum,
            a_rows=torch.cat([record.a_blocks[call] for call in calls])
            if record.a_blocks
            else None,
            g_rows=g_rows,
            exact=not record.half,
        )
