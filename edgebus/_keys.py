"""CurveZMQ key pair files and the fleet HMAC key file.

* :func:`new_keypair` writes ``NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 0600) in the
  ZeroMQ certificate format (what ``edgebus keys new NAME`` calls).
* :func:`load_keypair`, :func:`load_public_keys` read them back; a directory of ``*.key`` files is the
  allowlist of client public keys.
* :func:`new_hmac_key` / :func:`load_hmac_key` handle the shared secret that signs frame headers (64 hex
  characters in a 0600 file).

Every failure is a :class:`ConfigError` naming the file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import zmq
import zmq.auth

from ._errors import ConfigError

HMAC_KEY_BYTES = 32


def new_keypair(name: str, directory: Path | str) -> tuple[Path, Path]:
    """Create a CURVE key pair; returns ``(public_path, secret_path)``. Refuses to overwrite."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"key name {name!r}: use letters, digits, '-' and '_'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for path in (directory / f"{name}.key", directory / f"{name}.key_secret"):
        if path.exists():
            raise ConfigError(f"{path} already exists")
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    except (OSError, zmq.ZMQError) as exc:
        raise ConfigError(f"cannot create key pair {name!r} in {directory}: {exc}") from exc
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_keypair(secret_path: Path | str) -> tuple[bytes, bytes]:
    """Read ``(public_key, secret_key)`` (z85) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(secret_path)
    except (OSError, ValueError, zmq.ZMQError) as exc:
        raise ConfigError(f"{secret_path}: cannot read key pair: {exc}") from exc
    if secret is None:
        raise ConfigError(f"{secret_path}: holds no secret key")
    return public, secret


def load_public_key(path: Path | str) -> bytes:
    """Read one z85 public key from a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError, zmq.ZMQError) as exc:
        raise ConfigError(f"{path}: cannot read public key: {exc}") from exc
    return public


def load_public_keys(directory: Path | str) -> frozenset[bytes]:
    """Every public key in ``directory/*.key``: the allowlist of CURVE clients."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory of public keys")
    return frozenset(load_public_key(p) for p in sorted(directory.glob("*.key")))


def new_hmac_key(path: Path | str) -> Path:
    """Write a fresh random HMAC key (hex) to ``path`` with mode 0600. Refuses to overwrite."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create HMAC key: {exc}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(HMAC_KEY_BYTES) + "\n")
    return path


def load_hmac_key(path: Path | str) -> bytes:
    try:
        text = Path(path).read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read HMAC key: {exc}") from exc
    if len(key) < 16:
        raise ConfigError(f"{path}: HMAC key shorter than 16 bytes")
    return key
