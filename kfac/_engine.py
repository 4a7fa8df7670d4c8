"""The engine: the phases of one step, in a fixed order, over the registered layers.

============  =========================================================================
phase         what happens
============  =========================================================================
capture       the gradient matrix of every layer with a gradient; the hooks' records
reduce        statistics across processes (``kfac.distributed``; a no-op in one process)
update        on factor steps: ``block.update(state, batch, tick)`` per layer
(correct)     a block's optional ``correct`` hook: the gradient it preconditions
refresh       every step: ``block.refresh(state, tick)`` (the block decides what to do)
exchange      owners broadcast the representations they refreshed, every process installs
              them and prepares its inverses (``kfac.distributed``; in one process the
              refresh prepares them itself)
direction     ``block.direction(state, grad, batch, tick)`` per ready layer
clip          per-layer RMS clip, then the global KL clip (device scalars)
write         one fused finiteness check, then ``.grad``; a non-finite direction is never
              written (the layer keeps its gradient)
(commit)      a block's optional ``commit`` hook: the final directions into its state
============  =========================================================================

One :class:`Clock` turns the scheduled hyperparameters into a :class:`~kfac._curvature.Tick`
per step. The engine arms the capture for the coming step at the end of each step, with each
block's :class:`~kfac._curvature.CaptureSpec`.

Host synchronisation. A step that is neither a factor-update nor a refresh step reads
nothing back from the device: directions, clipping and the finiteness check of what is
written stay on the device, and a layer found non-finite is reported at the next step that
synchronises anyway (a factor or refresh step), or by :meth:`Engine.report`. Factor and
refresh steps read finiteness flags and the decompositions' scalars.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._capture import Capture
from ._clip import kl_clip_scale, rms_clip
from ._curvature import CaptureSpec, CurvatureBlock, LayerBatch, Tick, all_finite
from ._schedule import Schedule

__all__ = ["PHASES", "Clock", "Engine"]

PHASES = (
    "capture",
    "reduce",
    "update",
    "refresh",
    "exchange",
    "direction",
    "clip",
    "write",
)


@dataclass(frozen=True)
class Clock:
    """The step's schedule: factor and refresh periods, EA decay and damping."""

    factor_every: Schedule[int]
    inverse_every: Schedule[int]
    factor_decay: Schedule[float]
    damping: Schedule[float]

    def is_factor_step(self, step: int) -> bool:
        return step % self.factor_every(step) == 0

    def tick(self, step: int) -> Tick:
        period = self.inverse_every(step)
        return Tick(
            step=step,
            factor=self.is_factor_step(step),
            inverse=step % period == 0,
            decay=self.factor_decay(step),
            inverse_period=period,
            damping=self.damping(step),
        )


class Engine:
    """Runs the phases of each step over ``layers`` with one curvature ``block``.

    Parameters
    ----------
    model : nn.Module
    layers : mapping of name to layer helper
        The layers to precondition (``kfac._layers.discover``).
    block : CurvatureBlock
        The method.
    clock : Clock
    capture : Capture
        The hooks on ``model`` (the engine arms them).
    dtype : torch.dtype
        dtype of the gradient matrices and directions.
    kl_clip, rms_clip, lr : Schedule or None
        Clipping thresholds and the default learning rate of the KL clip.
    grad_scaler : torch.amp.GradScaler or None
        Non-finite steps of an enabled scaler are its own to skip: no warning.
    time_phases : bool
        Accumulate the seconds of each phase in :attr:`timings` (synchronising the device
        around each phase on CUDA so the times are the work's, not the launches').
    dist : callable(layers, block) -> kfac.distributed.Runtime, optional
        Builds the distributed phases (``None``: one process). With it, the update and the
        refresh run for the parts this process owns, the reduce phase combines the
        processes' statistics and the exchange phase installs the owners' representations.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, Any],
        block: CurvatureBlock[Any],
        *,
        clock: Clock,
        capture: Capture,
        dtype: torch.dtype,
        kl_clip: Schedule[float] | None,
        rms_clip: Schedule[float] | None,
        lr: Schedule[float] | None,
        grad_scaler: Any,
        time_phases: bool,
        dist: Any = None,
    ) -> None:
        self.model = model
        self.layers = dict(layers)
        self.block = block
        self.clock = clock
        self.capture = capture
        self.dtype = dtype
        self.kl_clip = kl_clip
        self.rms_clip = rms_clip
        self.lr = lr
        self.grad_scaler = grad_scaler
        self.time_phases = time_phases
        self.timings = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        block.check_layers(self.layers)
        #: The distributed phases (``kfac.distributed.Runtime``), ``None`` in one process.
        self.dist = dist(self.layers, block) if dist is not None else None
        self.states: dict[str, Any] = {name: block.init(layer) for name, layer in layers.items()}
        self._pending: list[tuple[int, list[str], Tensor, set[str]]] = []
        self.arm()

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A ``torch.profiler.record_function`` range ``kfac.<name>``, timed when asked."""
        with torch.profiler.record_function(f"kfac.{name}"):
            if not self.time_phases:
                yield
                return
            self._synchronize()
            start = time.perf_counter()
            try:
                yield
            finally:
                self._synchronize()
                self.timings[name] += time.perf_counter() - start

    def _synchronize(self) -> None:
        devices = {p.device for layer in self.layers.values() for p in layer.params}
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def plan(self) -> dict[str, CaptureSpec]:
        """What each layer records on the coming step."""
        factor = self.clock.is_factor_step(self.steps)
        plan = {}
        for name, layer in self.layers.items():
            spec = self.block.capture(layer, self.states[name], factor)
            if spec is not None:
                plan[name] = spec
        return plan

    def arm(self) -> None:
        """Arm the capture for the coming step."""
        self.capture.arm(self.plan(), statistics=self.clock.is_factor_step(self.steps))

    def _scaler_owns_overflow(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def warn_nonfinite(self, names: list[str], what: str, step: int, outcome: str) -> None:
        """One warning naming the layers whose ``what`` was non-finite at ``step``."""
        if not names or self._scaler_owns_overflow():
            return
        layers = ", ".join(self.layers[name].describe() for name in names)
        warnings.warn(
            f"non-finite {what} in layer {layers} at step {step}: {outcome}",
            RuntimeWarning,
            stacklevel=5,
        )

    def report(self) -> None:
        """Warn about the layers whose direction was found non-finite (and so not written)
        since the last report: reads the flags the write phase kept on the device."""
        pending, self._pending = self._pending, []
        for step, names, flags, reported in pending:
            bad = [
                name
                for name, ok in zip(names, flags.tolist(), strict=True)
                if not ok and name not in reported
            ]
            self.warn_nonfinite(bad, "direction", step, ".grad left as it was")

    # ------------------------------------------------------------------ the step
    def step(self, lr: float | Mapping[Tensor, float] | None = None) -> None:
        """Run the phases of one step (see the module docstring)."""
        tick = self.clock.tick(self.steps)
        synchronising = tick.factor or tick.inverse
        if synchronising:
            self.report()
        reported: set[str] = set()
        try:
            with self.phase("capture"):
                grads = {
                    name: layer.grad_matrix(self.dtype)
                    for name, layer in self.layers.items()
                    if layer.has_grad()
                }
                batches = {name: self.capture.batch(name) for name in self.capture.plan}
            runtime = self.dist
            with self.phase("reduce"):
                if runtime is not None and not runtime.local:
                    batches = runtime.reduce(self.capture.plan, batches)
            if tick.factor:
                with self.phase("update"):
                    reported = self._update(grads, batches, tick)
            with self.phase("direction"):
                targets = self._correct(grads, tick, lr)
            before = dict(self.states)
            with self.phase("refresh"):
                for name, layer in self.layers.items():
                    if runtime is None or runtime.replicated:
                        self.states[name] = self.block.refresh(layer, self.states[name], tick)
                    else:
                        owned = runtime.owned[name]
                        state = self.block.refresh_parts(layer, self.states[name], tick, owned)
                        self.states[name] = state
            with self.phase("exchange"):
                if runtime is not None and not runtime.replicated:
                    settled = all(self.block.ready(state) for state in before.values())
                    self.states = runtime.exchange(before, self.states, tick, settled)
            # a process's own rows do not reproduce the averaged gradient (local statistics)
            rows = batches if runtime is None or not runtime.local else {}
            with self.phase("direction"):
                ready = [name for name in targets if self.block.ready(self.states[name])]
                mine = ready if runtime is None else runtime.directing(ready)
                directions = {
                    name: self.block.direction(
                        self.layers[name], self.states[name], targets[name], rows.get(name), tick
                    )
                    for name in mine
                }
            if runtime is not None and runtime.split_directions:
                with self.phase("exchange"):  # each layer's direction from its process
                    directions = runtime.share(directions, ready, targets)
            with self.phase("clip"):
                directions, scale = self._clip(directions, targets, tick, lr)
            with self.phase("write"):
                self._write(directions, grads, tick, reported, scale)
            self._commit(directions, grads, tick)
            if synchronising:
                self.report()
        finally:
            self.steps += 1
            self.capture.reset()
            self.arm()

    def _update(
        self, grads: Mapping[str, Tensor], batches: Mapping[str, LayerBatch | None], tick: Tick
    ) -> set[str]:
        """Update the layers whose gradient and statistics are finite; return the layers
        reported for a non-finite gradient."""
        names = list(grads)
        for name in names:
            # a layer not used by this loss has a zero gradient after zero_grad(set_to_none=
            # False): it has no statistics to fold in (one read, only for such layers)
            if name in self.capture.plan and batches.get(name) is None and bool(grads[name].any()):
                layer = self.layers[name]
                module = getattr(layer, "owner_module", None) or layer.module
                if not module.training:
                    raise RuntimeError(
                        f"layer {layer.describe()} has a gradient but is in eval mode on "
                        f"factor-update step {tick.step}: K-FAC records only training-mode "
                        "forwards (an evaluation forward must not change the curvature), so "
                        "train with model.train() (switch dropout off by other means), or "
                        "exclude the layer with `skip_layers`"
                    )
                raise RuntimeError(
                    f"layer {layer.describe()} has a gradient but its hooks never "
                    f"fired on factor-update step {tick.step}: K-FAC records a layer through "
                    "its forward and output-gradient hooks, so it must be called as a module "
                    "in a forward with gradients enabled (not through torch.nn.functional with "
                    "its weight); exclude it with `skip_layers` otherwise"
                )
        if self.dist is not None:
            return self._update_distributed(grads, batches, tick)
        # one read of every layer's finiteness: gradient, then statistics
        flags = [all_finite(grads[name]) for name in names]
        flags += [batch.finite() for name in names if (batch := batches.get(name)) is not None]
        values = torch.stack([f.to(flags[0].device) for f in flags]).tolist() if flags else []
        grad_ok = dict(zip(names, values[: len(names)], strict=True))
        with_batch = [name for name in names if batches.get(name) is not None]
        stats_ok = dict(zip(with_batch, values[len(names) :], strict=True))
        bad_grads = [n for n in names if not grad_ok[n]]
        unchanged = "left unused, factors unchanged"
        self.warn_nonfinite(bad_grads, "gradient", tick.step, f"gradient {unchanged}")
        bad = [n for n in with_batch if grad_ok[n] and not stats_ok[n]]
        self.warn_nonfinite(bad, "statistics", tick.step, f"statistics {unchanged}")
        for name in with_batch:
            batch = batches[name]
            # a batch of no samples carries no statistics: the factors stay as they are
            if grad_ok[name] and stats_ok[name] and batch is not None and batch.n > 0:
                layer = self.layers[name]
                self.states[name] = self.block.update(layer, self.states[name], batch, tick)
        return set(bad_grads)

    def _update_distributed(
        self, grads: Mapping[str, Tensor], batches: Mapping[str, LayerBatch | None], tick: Tick
    ) -> set[str]:
        """:meth:`_update` of the owned parts, with the finiteness flags of every layer
        agreed between the processes (a layer non-finite on one is skipped on all)."""
        assert self.dist is not None
        names = list(self.layers)
        flags = torch.ones(2 * len(names), dtype=torch.int32)
        checks = []
        for name in names:
            checks.append(all_finite(grads[name]) if name in grads else None)
            batch = batches.get(name)
            checks.append(None if batch is None else batch.finite())
        for i, check in enumerate(checks):
            if check is not None:
                flags[i] = int(bool(check))
        agreed = self.dist.agree(flags).tolist()
        grad_ok = {name: bool(agreed[2 * i]) for i, name in enumerate(names)}
        stats_ok = {name: bool(agreed[2 * i + 1]) for i, name in enumerate(names)}
        unchanged = "left unused, factors unchanged"
        bad_grads = [n for n in names if n in grads and not grad_ok[n]]
        self.warn_nonfinite(bad_grads, "gradient", tick.step, f"gradient {unchanged}")
        with_batch = [n for n in names if n in grads and batches.get(n) is not None]
        bad = [n for n in with_batch if grad_ok[n] and not stats_ok[n]]
        self.warn_nonfinite(bad, "statistics", tick.step, f"statistics {unchanged}")
        for name in with_batch:
            batch = batches[name]
            owned = self.dist.owned[name]
            if not (grad_ok[name] and stats_ok[name] and batch is not None and batch.n > 0):
                continue
            layer = self.layers[name]
            if self.dist.replicated:  # every process updates every layer (global rows)
                self.states[name] = self.block.update(layer, self.states[name], batch, tick)
            elif owned:
                state = self.block.update_parts(layer, self.states[name], batch, tick, owned)
                self.states[name] = state
        return set(bad_grads)

    def _correct(self, grads: Mapping[str, Tensor], tick: Tick, lr: Any) -> Mapping[str, Tensor]:
        """The gradients the block preconditions (its optional ``correct`` hook)."""
        correct = getattr(self.block, "correct", None)
        if correct is None or type(self.block).correct is CurvatureBlock.correct:
            return grads
        targets = {}
        for name, V in grads.items():
            layer = self.layers[name]
            rate = None
            if lr is not None or self.lr is not None:
                rate = self._lr_for(lr, layer.params[0])
            self.states[name], targets[name] = correct(layer, self.states[name], V, tick, rate)
        return targets

    def _commit(
        self, directions: Mapping[str, Tensor], grads: Mapping[str, Tensor], tick: Tick
    ) -> None:
        """The block's optional ``commit`` hook, with each layer's final direction."""
        commit = getattr(self.block, "commit", None)
        if commit is None or type(self.block).commit is CurvatureBlock.commit:
            return
        for name, D in directions.items():
            layer = self.layers[name]
            self.states[name] = commit(layer, self.states[name], grads[name], D, tick)

    def _lr_for(self, lr: Any, weight: Tensor) -> float:
        if isinstance(lr, Mapping):
            return float(lr[weight])
        if lr is not None:
            return float(lr)
        if self.lr is None:
            raise ValueError("kl_clip needs a learning rate: pass `lr` to the constructor or step")
        return self.lr(self.steps)

    def _clip(
        self, directions: dict[str, Tensor], grads: Mapping[str, Tensor], tick: Tick, lr: Any
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The RMS-clipped directions and the KL clip's scale (0-d, ``None`` when off), which
        the write applies; it is applied here when a ``commit`` hook needs the final
        directions."""
        rms = 0.0 if self.rms_clip is None else self.rms_clip(tick.step)
        if rms > 0:  # a clip of 0 (or None) is off
            directions = {name: rms_clip(D, rms) for name, D in directions.items()}
        kappa = 0.0 if self.kl_clip is None else self.kl_clip(tick.step)
        if kappa > 0 and directions:  # a clip of 0 (or None) is off
            terms = [
                (D, grads[name], self._lr_for(lr, self.layers[name].params[0]))
                for name, D in directions.items()
            ]
            nu = kl_clip_scale(terms, kappa)
            commit = getattr(self.block, "commit", None)
            if commit is None or type(self.block).commit is CurvatureBlock.commit:
                return directions, nu
            directions = {
                name: D * nu.to(device=D.device, dtype=D.dtype) for name, D in directions.items()
            }
        return directions, None

    def _write(
        self,
        directions: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        tick: Tick,
        reported: set[str],
        scale: Tensor | None = None,
    ) -> None:
        """Write ``scale * D`` (``D`` when ``scale`` is ``None``) into ``.grad`` for every
        layer whose scaled direction is finite; the others keep their gradient. With ``0 <=
        scale <= 1`` (a clip's scale), ``scale * D`` is finite exactly when ``D`` and
        ``scale`` are. The flags stay on the device (see :meth:`Layer.write_grad`)."""
        if not directions:
            return
        names = list(directions)
        device = directions[names[0]].device
        flags = torch.stack([all_finite(directions[n]).to(device) for n in names])
        if scale is not None:
            flags = flags & torch.isfinite(scale).to(device)
        for i, name in enumerate(names):
            D = directions[name]
            nu = None if scale is None else scale.to(device=D.device, dtype=D.dtype)
            self.layers[name].write_grad(D, nu, flags[i].to(D.device))
        self._pending.append((tick.step, names, flags, reported))
