"""kfac: Kronecker-factored natural-gradient optimizers for PyTorch, built on lowrank_nla.

This release ships the package skeleton only: the optimizers (``KFAC``,
``KFACPreconditioner`` and the low-rank variants) are not implemented yet, so nothing is
exported. See the project README for the roadmap.
"""

__all__: list[str] = []
