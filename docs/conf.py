"""Sphinx configuration: numpydoc API reference, MyST pages, executed notebooks.

Why Sphinx + numpydoc (not MkDocs + mkdocstrings): every docstring in the project is
numpydoc, the scientific-Python standard (NumPy, SciPy, scikit-learn), and numpydoc both
renders it and validates it (`numpydoc_validation_checks`), which is how a missing docstring
fails the strict build. MyST-NB renders the Markdown pages and executes the notebooks.
"""

from __future__ import annotations

import lowrank_nla

project = "lowrank_nla + kfac"
author = "lowrank_nla + kfac developers"
release = lowrank_nla.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_nb",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "README.md"]
root_doc = "index"

# API reference: one page per public name, generated from the packages' __all__.
autosummary_generate = True
autodoc_default_options = {"members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# GL08: "The object does not have a docstring": a public name without one fails the build.
numpydoc_validation_checks = {"GL08"}

# Notebooks are stored without outputs; the build executes them and fails on any error.
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "lowrank_nla + kfac"
html_static_path: list[str] = []
suppress_warnings = ["mystnb.unknown_mime_type"]
