"""Short display labels for swept values: ``optimizer.lr=0.04043878009515104`` reads as ``lr=0.0404``.

Optuna draws floats with 16 significant digits and Hydra keys are dotted paths; both made trial
lines, run names and figure legends too long to read or to tell apart. Labels here are for people
(console lines, run names, legends): params and tags keep the exact values.

Imports nothing heavy: every layer may use it.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

DIGITS = 3  #: significant digits of a float in a label

_FLOAT = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])")
_DOTTED_KEY = re.compile(r"(?<![\w.])(?:\w+\.)+(\w+)=")


def short_value(value: Any) -> str:
    """Floats (also as text, as MLflow params hold them) to ``DIGITS`` significant digits; other values as given."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return _FLOAT.sub(lambda m: short_value(float(m.group())) if "." in m.group() or "e" in m.group().lower()
                          else m.group(), value)
    if isinstance(value, float):
        return f"{value:.{DIGITS}g}"
    return str(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's last dotted part (``optimizer.lr`` -> ``lr``), the whole key where two would read alike."""
    last = {k: k.rsplit(".", 1)[-1] for k in keys}
    clash = {s for s in last.values() if list(last.values()).count(s) > 1}
    return {k: k if s in clash else s for k, s in last.items()}


def params_text(params: Mapping[str, Any]) -> str:
    """``{"optimizer.lr": 0.0404387, "model.num_layers": 3}`` -> ``lr=0.0404 num_layers=3``."""
    names = short_keys(list(params))
    return " ".join(f"{names[k]}={short_value(v)}" for k, v in params.items())


def trial_label(number: int, params: Mapping[str, Any]) -> str:
    """What a trial is called on the console and in MLflow: ``trial 7: lr=0.0404 num_layers=3``."""
    text = params_text(params)
    return f"trial {number}: {text}" if text else f"trial {number}"


def shorten(label: str) -> str:
    """A label made of ``key=value`` words (a run name, a configuration) with short keys and values."""
    return short_value(_DOTTED_KEY.sub(lambda m: f"{m.group(1)}=", label))
