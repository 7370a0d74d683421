"""Choosing an estimator per ``pyro.sample`` site: the annotation and the handler.

A Bernoulli site opts into an estimator through its ``infer`` dict::

    h = pyro.sample("h", dist.Bernoulli(logits=a), infer={"estimator": "straight_through"})
    z = pyro.sample("z", dist.Bernoulli(logits=b),
                    infer={"estimator": estimators.get("score_function", baseline="optimal")})

or from outside the program with :func:`estimator_config` (a dict ``site name -> estimator``
or a callable ``msg -> estimator | None``, in the manner of Pyro's ``poutine.reparam``)::

    with estimator_config(config={"h": "sts"}):
        loss = surrogate_loss(program, x)

    program = estimator_config(program, {"h": "sts", "g": "noisy_rectifier"})
    program = estimator_config(program, config=lambda msg: "straight_through"
                               if msg["name"].startswith("gate") else None)

An estimator is a registry name or an :class:`~stochgrad.estimators.base.Estimator` object.
The annotation is only read by :class:`~stochgrad.estimators.elbo.EstimatorELBO` and
:func:`~stochgrad.estimators.surrogate.surrogate_loss`; under any other inference a site with
an annotation samples exactly as before.

Precedence: a handler overrides the site's own annotation for the sites it names (the
callable returning ``None`` names none), and an outer handler overrides an inner one, as
Pyro's ``infer_config`` does. ``poutine.block`` hides sites from handlers outside it. The
handler is idempotent. Observed and subsample sites are never annotated: an annotation on an
observed site, and a dict entry that names no latent sample site the handler saw (a typo, an
observed site, a site hidden by ``block``), are ignored with a ``UserWarning`` naming them --
once per site name for a handler, and for an observed site's annotation once per run of
:func:`~stochgrad.estimators.surrogate.surrogate_loss` or
:class:`~stochgrad.estimators.elbo.EstimatorELBO` (Python's warning filter shows a repeat once).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, Message
from pyro.poutine.util import site_is_subsample

from .base import Estimator
from .registry import available, get

ESTIMATOR_KEY = "estimator"

EstimatorSpec = str | Estimator
Config = Mapping[str, EstimatorSpec | None] | Callable[[Message], EstimatorSpec | None]

# One shared instance per registry name used as a plain string (those carry no options, so
# they hold no state worth separating).
_BY_NAME: dict[str, Estimator] = {}


def resolve_estimator(spec: Any, site: str) -> Estimator:
    """The estimator object for an annotation ``spec`` at ``site``.

    Raises ``ValueError`` naming the site and the valid names for an unknown name, and
    ``TypeError`` naming the site for anything that is neither a name nor an estimator.
    """
    if isinstance(spec, Estimator):
        return spec
    if isinstance(spec, str):
        if spec not in _BY_NAME:
            if spec not in available():
                raise ValueError(
                    f"site {site!r}: unknown estimator {spec!r}; valid names: "
                    f"{', '.join(available())}"
                )
            _BY_NAME[spec] = get(spec)
        return _BY_NAME[spec]
    raise TypeError(
        f"site {site!r}: infer['{ESTIMATOR_KEY}'] must be an estimator name (one of "
        f"{', '.join(available())}) or an Estimator object "
        f"(stochgrad.estimators.get(name, **options)); got {type(spec).__name__}"
    )


def annotatable(msg: Any) -> bool:
    """Whether a message is a latent sample site an estimator can be attached to."""
    return msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg)


class EstimatorMessenger(Messenger):
    """Sets ``msg["infer"]["estimator"]`` at the sites named by ``config``.

    ``config``: a dict ``site name -> estimator`` (a registry name, an estimator object or
    ``None`` to leave the site alone), or a callable ``msg -> estimator | None``. Names in a
    dict are checked when the handler is built; a callable's answers when a site is reached.
    """

    def __init__(self, config: Config):
        super().__init__()
        if isinstance(config, Mapping):
            checked: dict[str, Estimator | None] = {}
            for name, spec in config.items():
                if not isinstance(name, str):
                    raise TypeError(
                        f"estimator config keys must be site names (str), got {name!r} of "
                        f"type {type(name).__name__}"
                    )
                checked[name] = None if spec is None else resolve_estimator(spec, name)
            self.config: Any = checked
            # per entry: how the sites of that name were seen while the handler was active
            self._seen: dict[str, str] = {}
            self._warned: set[str] = set()
        elif callable(config):
            self.config = config
        else:
            raise TypeError(
                "estimator config must be a dict {site name: estimator} or a callable "
                f"msg -> estimator | None (like poutine.reparam's config); got "
                f"{type(config).__name__}"
            )

    def lookup(self, msg: Any) -> Estimator | None:
        """The estimator this handler assigns to the site of ``msg``, or ``None``."""
        if not annotatable(msg):
            return None
        if isinstance(self.config, dict):
            return self.config.get(msg["name"])
        spec = self.config(msg)
        return None if spec is None else resolve_estimator(spec, msg["name"])

    def __enter__(self) -> EstimatorMessenger:
        if isinstance(self.config, dict):
            self._seen = {}
        return super().__enter__()

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None and isinstance(self.config, dict):
            self._warn_unused()

    def _warn_unused(self) -> None:
        reasons = {
            "observed": "an observed site (only latent sites take an estimator)",
            "subsample": "a plate's subsample site",
        }
        unused: dict[str, list[str]] = {}
        for name, spec in self.config.items():
            kind = self._seen.get(name)
            if spec is None or kind == "latent" or name in self._warned:
                continue
            why = reasons.get(kind or "", "no sample site of that name reached the handler")
            unused.setdefault(why, []).append(name)
            self._warned.add(name)
        for why, names in unused.items():
            warnings.warn(
                f"estimator_config: ignored entries {', '.join(repr(n) for n in names)}: {why}",
                UserWarning,
                stacklevel=3,
            )

    def _pyro_sample(self, message: Message) -> None:
        msg: Any = message
        if isinstance(self.config, dict) and msg["name"] in self.config:
            kind = (
                "subsample"
                if site_is_subsample(msg)
                else "observed"
                if msg["is_observed"]
                else "latent"
            )
            if self._seen.get(msg["name"]) != "latent":
                self._seen[msg["name"]] = kind
        est = self.lookup(msg)
        if est is not None:
            msg["infer"][ESTIMATOR_KEY] = est


def warn_observed_annotations(sites: Iterable[Any]) -> None:
    """Warn, naming them, about observed sample sites among ``sites`` that carry an annotation.

    ``sites``: trace nodes (messages). The annotation of an observed site is ignored.
    """
    names = sorted(
        {
            site["name"]
            for site in sites
            if site["type"] == "sample"
            and site["is_observed"]
            and site["infer"].get(ESTIMATOR_KEY) is not None
        }
    )
    if names:
        warnings.warn(
            f"infer['{ESTIMATOR_KEY}'] ignored at observed site(s) "
            f"{', '.join(repr(n) for n in names)}: an observed value is not sampled, so no "
            "estimator applies (annotate the latent sites)",
            UserWarning,
            stacklevel=4,
        )


def estimator_config(fn: Any = None, config: Config | None = None) -> Any:
    """Attach estimators to sites from outside the program (Pyro handler style).

    ``estimator_config(fn, config)`` wraps a callable; ``estimator_config(config=...)`` (or
    ``estimator_config({...})`` with a dict) is a context manager. See the module docstring.
    """
    if config is None and isinstance(fn, Mapping):
        fn, config = None, fn
    if config is None:
        raise TypeError(
            "estimator_config needs config=: a dict {site name: estimator} or a callable "
            "msg -> estimator | None"
        )
    messenger = EstimatorMessenger(config)
    return messenger if fn is None else messenger(fn)


def effective_annotation(msg: Any, frame: Messenger) -> Any:
    """The annotation the site will end with once handlers outside ``frame`` have run.

    ``frame`` must be on the effect stack. Handlers outside it process the message after it
    does; this applies their choice early (the way ``ReparamMessenger`` applies enclosing
    ``InitMessenger``s), stopping at a ``block`` that hides the site.
    """
    spec = msg["infer"].get(ESTIMATOR_KEY)
    index = next((i for i in range(len(_PYRO_STACK) - 1, -1, -1) if _PYRO_STACK[i] is frame), 0)
    for outer in reversed(_PYRO_STACK[:index]):
        if isinstance(outer, BlockMessenger) and outer.hide_fn(msg):
            break
        if isinstance(outer, EstimatorMessenger):
            est = outer.lookup(msg)
            if est is not None:
                spec = est
    return spec


__all__ = [
    "ESTIMATOR_KEY",
    "EstimatorMessenger",
    "annotatable",
    "estimator_config",
    "resolve_estimator",
    "warn_observed_annotations",
]
