"""Tiny ``key=value`` command-line parsing for the zoo's console scripts (no Hydra, no argparse sprawl)."""
from __future__ import annotations

from typing import Any, Sequence

_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def parse_kv(argv: Sequence[str], spec: dict[str, Any], usage: str) -> dict[str, Any]:
    """Parse ``key=value`` arguments against ``spec`` (key → default; ``...`` marks a required key).

    Values are converted to the default's type (bool, int, float); ``-h``/``--help`` prints ``usage``.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        raise SystemExit(0)
    out: dict[str, Any] = {k: v for k, v in spec.items() if v is not ...}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"error: expected key=value, got {arg!r}\n{usage}")
        if key not in spec:
            raise SystemExit(f"error: unknown argument {key!r}; known: {', '.join(spec)}\n{usage}")
        default = spec[key]
        if isinstance(default, bool):
            if value.lower() not in _TRUE | _FALSE:
                raise SystemExit(f"error: {key} must be true or false, got {value!r}")
            out[key] = value.lower() in _TRUE
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise SystemExit(f"error: {key} must be a {type(default).__name__}, got {value!r}") from None
        else:
            out[key] = None if value.lower() in ("null", "none", "") else value
    missing = [k for k, v in spec.items() if v is ... and k not in out]
    if missing:
        raise SystemExit(f"error: missing {', '.join(k + '=...' for k in missing)}\n{usage}")
    return out
