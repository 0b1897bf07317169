"""FIELD=VALUE settings of AdaptOptions (`stream --adapt-set`, bench.tta's --set): every field
of the adapter's options reachable from the command line, each parsed by its own parser."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from adapt_deploy.errors import UserError
from adapt_deploy.tta.options import AdaptOptions, ResetPolicy, parse_home, parse_threshold


def parse_size(text: str) -> tuple[int, int] | None:
    """'HxW' (or 'H,W') → (H, W); 'none' → None (the bundle's evaluation size); ValueError
    else."""
    if text.lower() == "none":
        return None
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected HxW (e.g. 128x256) or 'none', got {text!r}")
    return int(parts[0]), int(parts[1])


def _parse_threads(text: str) -> int | None:
    """A positive count, or 'none' (leave torch's thread count as it is)."""
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a positive integer or 'none', got {text!r}")
    return int(text)


# The AdaptOptions fields whose values are not a plain int, float or str.
SETTING_PARSERS: dict[str, Callable[[str], Any]] = {
    "threshold": parse_threshold,  # 'auto' or T in (0, 1)
    "reset": ResetPolicy.parse,  # 'collapse', 'periodic:N', 'collapse+periodic:N', 'none'
    "size": parse_size,
    "threads": _parse_threads,
    "home_distance": parse_home,  # 'auto' or a distance >= 0
}


def parse_settings(
    items: list[str], options: AdaptOptions | None = None, flag: str = "--adapt-set"
) -> AdaptOptions:
    """`options` (default AdaptOptions()) with each `field=value` of `items` applied, parsed by
    the field's own parser (SETTING_PARSERS, else the type of its default) and checked with
    AdaptOptions.check(); UserError with a one-line message naming `flag` and the item
    otherwise."""
    options = options or AdaptOptions()
    known = [f.name for f in fields(AdaptOptions)]
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or key not in known:
            raise UserError(
                f"{flag} {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(known)}"
            )
        kind = SETTING_PARSERS.get(key) or type(getattr(options, key))
        if kind not in (int, float, str) and key not in SETTING_PARSERS:
            raise UserError(f"{flag} {item!r}: {key} has no parser (SETTING_PARSERS)")
        try:
            values[key] = kind(text)
        except (ValueError, UserError) as exc:
            detail = str(exc) if key in SETTING_PARSERS else f"expected {kind.__name__}"
            raise UserError(f"{flag} {item!r}: {detail}") from None
    try:
        return replace(options, **values).check()
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None


def set_fields(items: list[str]) -> list[str]:
    """The field names `items` ('field=value') set, as given (not checked)."""
    return [item.partition("=")[0].strip() for item in items]
