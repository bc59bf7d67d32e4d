"""Names of benchmark conditions and what each means.

Grammar: a base, then ``+`` modifiers::

    no-context | text | facts-only                      receiver gets no KV
    kv-raw | kv-fp16 | kv-B | uniform-B                 uniform widths (B = 1..8), raw = model dtype
    adaptive-B                                          profiled widths at the SAME stored bits per value
                                                        as uniform-B (B + 32/G, scales counted)
    modifiers: +tokens  +evict-K  +obf  +layers-F  +facts

e.g. ``uniform-4+evict-0.25+obf``, ``adaptive-3+tokens+facts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qkv import Budget

Kind = Literal["no-context", "text", "facts-only", "card"]

ISSUE2_CONDITIONS = ("no-context", "text", "kv-raw", "kv-fp16", "kv-8", "kv-4", "kv-3", "kv-2")


@dataclass(frozen=True, kw_only=True)
class Condition:
    name: str
    kind: Kind
    budget: Budget | None = None


def parse_condition(name: str, *, group_size: int = 32) -> Condition:
    if name in ("no-context", "text", "facts-only"):
        return Condition(name=name, kind=name)  # type: ignore[arg-type]
    base, *mods = name.split("+")
    fields: dict[str, object] = {"group_size": group_size}
    if base == "kv-raw":
        fields["bits"] = 32
    elif base == "kv-fp16":
        fields["bits"] = 16
    elif base.startswith(("kv-", "uniform-")):
        fields["bits"] = int(base.split("-", 1)[1])
    elif base.startswith("adaptive-"):
        fields["bits"] = float(base.split("-", 1)[1]) + 32.0 / group_size
        fields["adaptive"] = True
    else:
        raise ValueError(f"unknown condition base {base!r} in {name!r}")
    for mod in mods:
        if mod == "tokens":
            fields["token_mixed"] = True
            if not fields.get("adaptive"):
                fields["bits"] = float(fields["bits"])  # type: ignore[arg-type]
        elif mod == "obf":
            fields["obf"] = True
        elif mod == "facts":
            fields["facts"] = True
        elif mod.startswith("evict-"):
            fields["keep"] = float(mod.split("-", 1)[1])
        elif mod.startswith("layers-"):
            fields["layers"] = float(mod.split("-", 1)[1])
        else:
            raise ValueError(f"unknown condition modifier {mod!r} in {name!r}")
    try:
        budget = Budget(**fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"condition {name!r}: {exc}") from exc
    return Condition(name=name, kind="card", budget=budget)
