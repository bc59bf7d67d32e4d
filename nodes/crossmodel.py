"""Cross-model wiring of a node: the calibrations its config names, checked against the model it runs.

A reader lists calibrations *from* its model (``[reader] translate``): receivers of those models get cards
translated with them. An answerer lists calibrations *to* its model (``[answerer] calibrations``): cards of
those senders' models are translated on arrival, and the ids are advertised in presence info
(``calibrations``) so a reader that translates at the receiver knows this node can read its card. A file
that is missing, corrupt or fitted for other models stops the node at start, naming the key and the file:
a node that silently skipped it would answer without context.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from qkv import CalibrationError, CrossModelCalibration, ModelFingerprint, ModelSide

from ._errors import ConfigFileError


def load_calibrations(
    config_file: Path,
    key: str,
    paths: Sequence[Path],
    fingerprint: ModelFingerprint,
    *,
    side: Literal["sender", "receiver"],
) -> tuple[CrossModelCalibration, ...]:
    """Load ``paths`` (config ``key``), each required to have this node's model as its ``side``."""
    out: list[CrossModelCalibration] = []
    for index, path in enumerate(paths):
        try:
            if side == "sender":
                calibration = CrossModelCalibration.load(path, sender=fingerprint)
            else:
                calibration = CrossModelCalibration.load(path, receiver=fingerprint)
        except CalibrationError as exc:
            raise ConfigFileError(config_file, f"{key}[{index}]", str(exc)) from None
        # One calibration per other model: two would leave which one a card names to chance.
        if any(_other(c, side).fingerprint == _other(calibration, side).fingerprint for c in out):
            other = _other(calibration, side).describe()
            raise ConfigFileError(config_file, f"{key}[{index}]", f"a second calibration for {other}")
        out.append(calibration)
    return tuple(out)


def _other(calibration: CrossModelCalibration, side: Literal["sender", "receiver"]) -> ModelSide:
    """The side of ``calibration`` that is not this node's model."""
    return calibration.receiver if side == "sender" else calibration.sender
