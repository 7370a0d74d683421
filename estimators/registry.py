"""Name -> estimator class registry.

Registry names are lower_snake, match the module that defines the estimator, and are part of
the public contract (``stochgrad.estimators.available()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .base import Estimator

_REGISTRY: dict[str, type[Estimator]] = {}

E = TypeVar("E", bound="type[Estimator]")


def register(cls: E) -> E:
    """Class decorator: register an :class:`Estimator` subclass under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower() or " " in name:
        raise ValueError(f"estimator class {cls.__name__} needs a lower_snake `name`, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"an estimator named {name!r} is already registered ({_REGISTRY[name]})")
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    """Sorted registry names of every estimator."""
    return sorted(_REGISTRY)


def get(name: Any, **options: Any) -> Estimator:
    """An estimator object from a registry name and its options.

    An :class:`Estimator` instance passes through unchanged (no options allowed then).
    Unknown names and unknown options raise ``ValueError`` listing the valid choices.
    """
    from .base import Estimator

    if isinstance(name, Estimator):
        if options:
            raise ValueError(
                f"options {sorted(options)} given with an estimator object {name!r}; "
                "set them when constructing it instead"
            )
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"expected an estimator name (str) or Estimator object, got {type(name).__name__}"
        )
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; valid names: {', '.join(available())}")
    cls = _REGISTRY[name]
    allowed = cls.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for estimator {name!r}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )
    return cls(**options)


def lookup(name: str) -> type[Estimator]:
    """The registered class for ``name`` (ValueError listing the valid names otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; valid names: {', '.join(available())}")
    return _REGISTRY[name]
