"""Modules that are also their main function (``stochgrad.analysis.compare`` and friends).

``stochgrad.analysis`` loads its names lazily; importing a submodule such as
``stochgrad.analysis.compare`` first binds the package's attribute of that name to the module.
Giving the module a ``__call__`` keeps ``analysis.compare(...)`` working in either order.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def callable_module(module_name: str, fn: Callable[..., Any]) -> None:
    """Make the module ``module_name`` callable as ``fn``."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    _CallableModule.__doc__ = f"Module {module_name}, callable as {fn.__name__}()."
    sys.modules[module_name].__class__ = _CallableModule
