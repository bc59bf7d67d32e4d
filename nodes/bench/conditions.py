"""Names of benchmark conditions and what each means.

Grammar: a base, then ``+`` modifiers::

    no-context | text | facts-only                      receiver gets no KV
    kv-raw | kv-fp16 | kv-B | uniform-B                 uniform widths (B = 1..8), raw = model dtype
    adaptive-B                                          profiled widths at the SAME stored bits per value
                                                        as uniform-B (B + 32/G, scales counted)
    modifiers: +tokens  +evict-K  +obf  +layers-F  +facts  +gN  +reread  +rot  +hrot  +sN  +head-F

``+gN`` sets the quantization group size (default: the bench's ``--group-size``): every group stores an fp16
scale and zero, ``32 / N`` bits per value, so ``uniform-2+g128`` stores 2.25 bits per value where
``uniform-2`` stores 3. An adaptive base then targets ``B + 32 / N`` and needs a profile calibrated at ``N``.

``+reread`` takes the attention statistics (eviction, token classes) from the sender re-reading the context
(``qkv.prefill_reread``) instead of from the context's last ``window`` tokens.

``+rot`` codes quantized K and V in the ``hadamard-prerope`` space, ``+hrot`` in the ``hadamard`` space
(:mod:`qkv._rotation`); ``+sN`` stores the first N tokens (attention sinks) in fp16 outside the groups. An
adaptive base with either needs a profile calibrated with the same coding.

``+head-F`` is a split hand-off whose head is the first fraction F of the prompt (per row, rounded): the
tail card under the condition's budget, answered with the head prefilled exactly, as a split's receiver
does. Its bytes are the tail card's plus 4 per head token id. A split of a row, not a card: the policy's
table leaves it out (the policy derives splits from card points).

e.g. ``uniform-4+evict-0.25+obf``, ``adaptive-3+tokens+facts``, ``uniform-2+g128+evict-0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qkv import Budget

Kind = Literal["no-context", "text", "facts-only", "card"]
#: Where a card condition's attention statistics come from (see the module docstring).
Importance = Literal["window", "reread"]

ISSUE2_CONDITIONS = ("no-context", "text", "kv-raw", "kv-fp16", "kv-8", "kv-4", "kv-3", "kv-2")


@dataclass(frozen=True, kw_only=True)
class Condition:
    name: str
    kind: Kind
    budget: Budget | None = None
    importance: Importance = "window"
    #: ``+head-F``: the fraction of each prompt's tokens kept exact, as a split's prefilled head.
    head_fraction: float | None = None


def parse_condition(name: str, *, group_size: int = 32) -> Condition:
    if name in ("no-context", "text", "facts-only"):
        return Condition(name=name, kind=name)  # type: ignore[arg-type]
    base, *mods = name.split("+")
    sizes = [mod for mod in mods if mod.startswith("g") and mod[1:].isdigit()]
    if len(sizes) > 1:
        raise ValueError(f"more than one group size in {name!r}")
    if sizes:
        group_size = int(sizes[0][1:])
        mods.remove(sizes[0])
    fields: dict[str, object] = {"group_size": group_size}
    importance: Importance = "window"
    head_fraction: float | None = None
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
        elif mod == "reread":
            importance = "reread"
        elif mod == "rot":
            fields["rotation"] = "hadamard-prerope"
        elif mod == "hrot":
            fields["rotation"] = "hadamard"
        elif mod.startswith("s") and mod[1:].isdigit():
            fields["fp16_sinks"] = int(mod[1:])
        elif mod.startswith("head-"):
            head_fraction = float(mod.split("-", 1)[1])
            if not 0 < head_fraction < 1:
                raise ValueError(f"condition {name!r}: the head fraction must be in (0, 1)")
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
    return Condition(
        name=name, kind="card", budget=budget, importance=importance, head_fraction=head_fraction
    )
