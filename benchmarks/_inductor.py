"""``torch._inductor.config`` settings for the benchmarks, from text: ``"KEY=VALUE,KEY=VALUE"``."""
from __future__ import annotations

import ast
import contextlib
from typing import Any, ContextManager, Dict


def inductor_settings(text: str) -> Dict[str, Any]:
    """``"coordinate_descent_tuning=True,max_autotune_pointwise=True"`` -> a dict for ``torch._inductor.config``
    (values as Python literals, else strings); a malformed item or an unknown key exits with a message naming it."""
    import torch._inductor.config as cfg
    out: Dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--inductor: {item!r} is not KEY=VALUE (e.g. coordinate_descent_tuning=True)")
        if not hasattr(cfg, key):
            raise SystemExit(f"--inductor: torch._inductor.config has no setting {key!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def inductor_patch(text: str) -> ContextManager:
    """The settings of ``text`` in force inside a ``with`` block ("": nothing changes)."""
    settings = inductor_settings(text)
    if not settings:
        return contextlib.nullcontext()
    import torch._inductor.config as cfg
    return cfg.patch(**settings)
