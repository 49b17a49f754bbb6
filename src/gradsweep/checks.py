"""Range checks for config schemas: each failure is one line naming the key and the allowed values."""
from __future__ import annotations

import math
from typing import Any

from gradsweep.errors import ConfigError


def require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def choice(key: str, value: Any, allowed: tuple) -> None:
    require(value in allowed, key, value, "|".join(str(a) for a in allowed))


FLOAT32_MAX = 3.4028234663852886e38  #: values past it become inf in the float32 tensors they enter


def positive(key: str, value: float, strict: bool = True) -> None:
    ok = value > 0 if strict else value >= 0
    require(ok and math.isfinite(value) and value <= FLOAT32_MAX, key, value,
            "a finite number " + ("> 0" if strict else ">= 0") + " that fits float32 (<= 3.4e38)")

