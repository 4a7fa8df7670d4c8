"""Named K-FAC configurations: the library defaults, the thesis' settings, the command line's.

:func:`preset` returns the keyword arguments of one configuration, to pass to
:class:`~kfac.KFAC` (``optimizer=True``) or :class:`~kfac.KFACPreconditioner`
(``optimizer=False``: the preconditioner has no momentum, and its KL clip needs the step's
learning rate, which it is given only through ``lr=``). The defaults were chosen by
measurement over four tasks and two run lengths (docs/kfac.md, *Defaults, by measurement*).
"""

from __future__ import annotations

from typing import Any

from ._schedule import InverseDecay

__all__ = ["PRESETS", "preset"]

#: Each named configuration: the keyword arguments of ``KFAC(model, lr, **kwargs)``.
PRESETS: dict[str, dict[str, Any]] = {
    # what KFAC(model, lr) uses (tests/kfac/test_presets.py checks the signatures against it)
    "default": {
        "factor_decay": 0.95,
        "damping": 0.1,
        "damping_scheme": "factored",
        "factor_every": 1,
        "inverse_every": 10,
        "factor_init": "identity",
        # a KL clip that decays with the step, so that a long run's steps shrink
        "kl_clip": InverseDecay(1e-3, scale=50, power=2),
        "momentum": 0.9,
    },
    # the thesis' long-run settings (the library defaults before they were measured)
    "thesis": {
        "factor_decay": 0.95,
        "damping": 0.1,
        "damping_scheme": "factored-relative",
        "factor_every": 20,
        "inverse_every": 100,
        "factor_init": "identity",
        "kl_clip": None,
        "momentum": 0.0,
    },
    # ``python -m kfac --optimizer kfac``'s settings (its benchmarks' records use them)
    "command-line": {
        "factor_decay": 0.95,
        "damping": 3e-3,
        "damping_scheme": "factored-relative",
        "factor_every": 1,
        "inverse_every": 10,
        "factor_init": "identity",
        "kl_clip": 1e-4,
        "momentum": 0.9,
    },
}

#: Options of ``KFAC`` that ``KFACPreconditioner`` does not take.
_OPTIMIZER_ONLY = ("momentum",)
#: Where ``KFACPreconditioner``'s defaults differ from ``KFAC``'s: no KL clip (the clip needs
#: the step's learning rate, which only ``KFAC`` always knows).
_PRECONDITIONER = {"default": {"kl_clip": None}}


def preset(name: str, *, optimizer: bool = True) -> dict[str, Any]:
    """The keyword arguments of the named K-FAC configuration (a new dict each call).

    Parameters
    ----------
    name : {"default", "thesis", "command-line"}
        ``"default"``: what ``KFAC(model, lr)`` uses (factors every step, inverses every
        10, absolute factored damping 0.1, KL clip ``InverseDecay(1e-3, scale=50, power=2)``,
        that is ``1e-3 / (1 + step / 50) ** 2``, momentum 0.9). ``"thesis"``: the
        thesis' long-run settings (factors every 20 steps, inverses every 100, relative
        factored damping 0.1, no clip, no momentum). ``"command-line"``: the settings of
        ``python -m kfac --optimizer kfac`` (relative damping 3e-3, KL clip 1e-4, momentum
        0.9).
    optimizer : bool, default True
        ``True``: for :class:`~kfac.KFAC`; ``False``: for
        :class:`~kfac.KFACPreconditioner`, without ``momentum`` (set it on the optimizer
        that follows); ``"default"`` then has no KL clip, as ``KFACPreconditioner(model)``
        (a clip there needs ``lr=``).

    Returns
    -------
    dict
        Keyword arguments; change any of them before passing them on.

    Raises
    ------
    ValueError
        An unknown ``name`` (the message lists the valid ones).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> opt = kfac.KFAC(model, lr=0.3, **kfac.preset("thesis"))
    >>> opt.preconditioner.engine.clock.factor_every(0), opt.param_groups[0]["momentum"]
    (20, 0.0)
    >>> kfac.preset("default")["kl_clip"]  # 1e-3 / (1 + step / 50) ** 2
    InverseDecay(start=0.001, scale=50.0, power=2.0)
    >>> sorted(kfac.preset("default", optimizer=False))  # doctest: +NORMALIZE_WHITESPACE
    ['damping', 'damping_scheme', 'factor_decay', 'factor_every', 'factor_init',
     'inverse_every', 'kl_clip']
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"Invalid preset `name`: {name!r}; valid names are {list(PRESETS)}")
    kwargs = dict(PRESETS[name])
    if not optimizer:
        for key in _OPTIMIZER_ONLY:
            kwargs.pop(key)
        kwargs.update(_PRECONDITIONER.get(name, {}))
    return kwargs
