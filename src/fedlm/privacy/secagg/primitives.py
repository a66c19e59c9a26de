"""The cryptographic primitives of secure aggregation, each a thin call into a maintained library (none invented).

* Key agreement: X25519 (``cryptography``), the shared secret stretched by HKDF-SHA256 (RFC 5869) with a label, so
  the encryption key and the mask seed of a pair never coincide.
* Authenticated encryption of the secret shares relayed by the server: AES-256-GCM (``cryptography``) with the
  round and both client indices as associated data, so a share altered in transit, or replayed to another client
  or round, fails to decrypt (:class:`TamperedShareError`).
* Pseudo-random masks: the ChaCha20 keystream (``cryptography``) of a 32-byte seed read as little-endian uint32
  words, a cryptographic PRG (Flower's ``pseudo_rand_gen`` folds the seed to 32 bits for numpy's Mersenne twister,
  which is not one).
* Shamir's t-of-n secret sharing over GF(2^128): Flower's ``create_shares``/``combine_shares``
  (``flwr.common.secure_aggregation.crypto.shamir``, which uses PyCryptodome's ``Shamir``).
* Commitments: SHA-256 of the self-mask seed, published with the public keys, so a reconstructed seed can be checked.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from fedlm.core.errors import FedlmError

SEED_BYTES = 32
_RAW = serialization.Encoding.Raw
_NONCE_BYTES = 12


class TamperedShareError(FedlmError):
    """A secret share failed authentication, or a reconstructed secret does not match its commitment."""


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key from the OS's CSPRNG."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte raw public key of ``key``."""
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte raw private key (what is secret-shared for dropout recovery)."""
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    """The X25519 private key of 32 raw bytes."""
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, label: bytes) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public), info=label): 32 bytes both sides of a pair derive alike."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=label).derive(shared)


def random_seed() -> bytes:
    """32 bytes from the OS's CSPRNG (a self-mask seed b_u)."""
    return os.urandom(SEED_BYTES)


def commitment(secret: bytes) -> bytes:
    """SHA-256 of ``secret``: published before the secret is shared, checked after it is reconstructed."""
    return hashlib.sha256(secret).digest()


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: nonce || ciphertext || tag, bound to ``associated`` (round and sender/receiver indices)."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, blob: bytes, associated: bytes, *, sender: str) -> bytes:
    """The plaintext of :func:`encrypt`; :class:`TamperedShareError` naming ``sender`` when authentication fails."""
    try:
        return AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        raise TamperedShareError(f"the secret share from client {sender!r} failed authentication (altered in transit)") from None


def mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint32 words: the ChaCha20 keystream of ``seed`` (zero nonce: one stream per seed)."""
    if length == 0:
        return np.zeros(0, dtype=np.uint32)
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor().update(b"\0" * (4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def share(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares of ``secret``, any ``threshold`` of which reconstruct it (share i is for index i+1)."""
    if not 1 <= threshold <= count:
        raise ValueError(f"Shamir sharing needs 1 <= threshold <= shares, got threshold {threshold} of {count}")
    return create_shares(secret, threshold, count)


def reconstruct(shares: list[bytes]) -> bytes:
    """The secret of ``threshold`` or more Shamir shares (any subset; each carries its index)."""
    return combine_shares(shares)


def share_index(blob: bytes) -> int:
    """The evaluation point of a share made by :func:`share` (its first 4 bytes, little-endian)."""
    return int.from_bytes(blob[:4], "little")
