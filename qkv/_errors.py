"""Exceptions raised by :mod:`qkv`.

Every error the codec raises on bad input is a :class:`QkvError`; callers that receive cards from a
network catch :class:`CardError` and count it, they never see a raw ``struct``/``msgpack``/``torch`` error::

    QkvError
    ├── CardError
    │   ├── CardFormatError (ValueError)      wrong magic, unknown version, truncated, malformed metadata
    │   │   └── CardDigestError               payload digest does not match the header
    │   └── CardCompatError                   made by another model, or needs a calibration we lack
    ├── ModelStoreError
    │   ├── UnknownModelError (KeyError)      name is not in the catalogue and is not a model directory
    │   ├── ModelNotPulledError               known name, but not converted into the local store yet
    │   ├── ModelCorruptError                 sha256 of a source file or stored file does not match
    │   └── StoreSpaceError (OSError)         not enough free disk space to convert
    └── CalibrationError                      missing, stale or malformed calibration profile/artifact
"""

from __future__ import annotations


class QkvError(Exception):
    """Base of every error raised by qkv."""


class CardError(QkvError):
    """A CacheCard could not be accepted."""


class CardFormatError(CardError, ValueError):
    """The bytes are not a well-formed CacheCard of a version we read."""


class CardDigestError(CardFormatError):
    """The payload does not hash to the digest recorded in the header."""


class CardCompatError(CardError):
    """A well-formed card that this receiver cannot use (other model, missing calibration)."""


class ModelStoreError(QkvError):
    """A model could not be found, pulled or loaded."""


class UnknownModelError(ModelStoreError, KeyError):
    """Not a catalogue name and not a local model directory."""

    def __str__(self) -> str:  # KeyError quotes its argument; a user wants the sentence
        return str(self.args[0]) if self.args else "unknown model"


class ModelNotPulledError(ModelStoreError):
    """A catalogue model that has not been converted into the store yet."""


class ModelCorruptError(ModelStoreError):
    """A checksum did not match."""


class StoreSpaceError(ModelStoreError, OSError):
    """Not enough disk space in the model store."""


class CalibrationError(QkvError):
    """A calibration profile or cross-model artifact is missing or unusable."""
