"""Method registry and variant-string parsing.

A variant string is a base variant name optionally followed by ``+key=value``
overrides of the method's options, for example ``full+k_neighbors=1``.
"""

from __future__ import annotations

from typing import Any

from h2vlr.methods.base import AnomalyMethod
from h2vlr.registry import Registry

METHODS: Registry[type[AnomalyMethod]] = Registry("method")


def register_method(cls: type[AnomalyMethod]) -> type[AnomalyMethod]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    return METHODS.register(cls.name, cls)


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """Split ``"base+key=value+..."`` into the base name and the option overrides."""
    base, *parts = variant.split("+")
    overrides: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(
                f"invalid variant override {part!r} in {variant!r}; expected key=value, "
                "for example full+k_neighbors=3"
            )
        overrides[key] = _parse_value(value)
    return base, overrides


def list_methods() -> list[str]:
    _import_builtin_methods()
    return METHODS.names()


def get_method_class(name: str) -> type[AnomalyMethod]:
    _import_builtin_methods()
    return METHODS.get(name)


def validate_variant(name: str, variant: str) -> None:
    """Raise ``ValueError`` naming the valid variants when ``variant`` is unknown."""
    cls = get_method_class(name)
    base, _ = parse_variant(variant)
    if base not in cls.variants:
        raise ValueError(
            f"unknown variant {base!r} of method {name!r}; valid: {', '.join(cls.variants)}"
        )


def create_method(
    name: str, variant: str = "full", options: dict[str, Any] | None = None
) -> AnomalyMethod:
    """Build method ``name``; ``+key=value`` parts of ``variant`` override ``options``."""
    validate_variant(name, variant)
    cls = get_method_class(name)
    _, overrides = parse_variant(variant)
    merged = {**(options or {}), **overrides}
    return cls(variant=variant, **merged)


def _import_builtin_methods() -> None:
    # Importing the modules runs their @register_method decorators.
    import h2vlr.methods  # noqa: F401
