"""Sealing: authenticated encryption of what trusted applications keep on disk.

A TEE binds persistent data to itself with a hardware unique key; the reference service binds it
to a master key in its state directory (`master.key`, mode 0600, created on first start). Each
trusted application gets its own key derived from the master key (HKDF-SHA256, info = the TA's
UUID), and every sealed blob is AES-256-GCM with a random 96-bit nonce and associated data that
names what the blob is (VM namespace and object id), so a blob moved to another VM's namespace or
renamed fails to unseal. This module knows files only for the master key; callers store blobs.
"""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_FILE = "master.key"
KEY_BYTES = 32
NONCE_BYTES = 12
FORMAT_VERSION = b"\x01"


class SealError(Exception):
    """A sealed blob is corrupt, truncated, or was sealed for something else."""


class Sealer:
    """Seals and unseals blobs with one key (a TA's key, from `for_app`)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a sealing key is {KEY_BYTES} bytes")
        self._key = key
        self._aead = AESGCM(key)

    def for_app(self, app: uuid.UUID) -> Sealer:
        """The sealer of one trusted application: its key never serves another TA."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=b"hyperbroker-tee-seal",
                    info=app.bytes)
        return Sealer(hkdf.derive(self._key))

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return FORMAT_VERSION + nonce + self._aead.encrypt(nonce, plaintext, associated)

    def unseal(self, blob: bytes, associated: bytes) -> bytes:
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != FORMAT_VERSION:
            raise SealError("not a sealed blob of a known format")
        nonce = blob[1 : 1 + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[1 + NONCE_BYTES :], associated)
        except InvalidTag:
            raise SealError("authentication failed: corrupt, or sealed for another owner") from None


def load_master_key(state_dir: Path) -> Sealer:
    """The service's root sealer: reads `master.key`, creating it (0600) the first time."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / MASTER_KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = _create(path)
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path}: a master key is {KEY_BYTES} bytes, found {len(key)}")
    return Sealer(key)


def _create(path: Path) -> bytes:
    """Write a new key with O_EXCL; a concurrent creator wins and its key is used."""
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key
