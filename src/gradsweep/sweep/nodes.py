"""OmegaConf nodes as plain Python values, typed as what they hold here."""
from __future__ import annotations

from typing import Any, Optional, cast

from omegaconf import OmegaConf


def plain_dict(node: Any) -> dict[str, Any]:
    """``OmegaConf.to_container`` of a mapping node, resolved. Its return type also allows a list,
    a string or None (other kinds of node); a mapping node gives a dict, which this checks."""
    out = OmegaConf.to_container(node, resolve=True)
    if not isinstance(out, dict):
        raise TypeError(f"expected a mapping node, got {type(out).__name__}")
    return cast(dict[str, Any], out)


def plain_dict_or_none(node: Any) -> Optional[dict[str, Any]]:
    return None if node is None else plain_dict(node)
