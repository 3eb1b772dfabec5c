"""Encryption at rest for write-only secrets (e.g. an OPC-UA password).

AES-256-GCM with the key of Settings.encryption_key (HALTLESS_ENCRYPTION_KEY)
or, when unset, one generated once into <data_dir>/encryption-key (mode 0600).
Every process that reads sources (server, pollers on any host) needs the same
key: set HALTLESS_ENCRYPTION_KEY when they do not share a data dir.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..core.errors import ConfigError
from .secretfile import secret_file

VERSION = b"\x01"


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError("encryption key must be 32 bytes (base64 of 32 random bytes)")
        self._aead = AESGCM(key)

    @staticmethod
    def key_for(data_dir: Path, configured: bytes | None = None) -> bytes:
        """The configured key (HALTLESS_ENCRYPTION_KEY), else the one kept in
        data_dir/encryption-key, generated there on first use (mode 0600)."""
        if configured:
            return configured
        path = Path(data_dir) / "encryption-key"
        raw = secret_file(path, lambda: base64.b64encode(os.urandom(32)))
        try:
            key = base64.b64decode(raw.strip(), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise ConfigError(f"{path}: not a base64 encryption key of 32 bytes")
        return key

    def seal(self, secrets: dict, context: bytes) -> bytes:
        """``context`` (e.g. the source id) is bound to the ciphertext, so a
        sealed value cannot be copied onto another row."""
        nonce = os.urandom(12)
        return VERSION + nonce + self._aead.encrypt(nonce, json.dumps(secrets).encode(), context)

    def open(self, sealed: bytes | None, context: bytes) -> dict:
        if not sealed:
            return {}
        if sealed[:1] != VERSION:
            raise ConfigError("sealed secret has an unknown format")
        try:
            plain = self._aead.decrypt(sealed[1:13], sealed[13:], context)
        except InvalidTag:
            raise ConfigError("cannot decrypt a stored secret: HALTLESS_ENCRYPTION_KEY differs "
                              "from the key it was stored with") from None
        return json.loads(plain)
