"""Registry of passes by name. A pass module registers itself with ``@register``."""

import difflib

from ..errors import RecipeError

PASSES: dict = {}


def register(cls):
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str):
    _load_all()
    if name not in PASSES:
        close = difflib.get_close_matches(str(name), PASSES, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "run `compress passes` to list them"
        raise RecipeError(f"unknown pass type '{name}'", hint)
    return PASSES[name]


def all_passes() -> dict:
    _load_all()
    return dict(sorted(PASSES.items()))


def _load_all():
    import importlib
    import pkgutil

    from .. import passes

    for info in pkgutil.iter_modules(passes.__path__):
        if info.name not in ("base", "registry"):
            importlib.import_module(f"{passes.__name__}.{info.name}")
