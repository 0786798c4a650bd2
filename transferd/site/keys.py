"""Key material in keys_dir: one Ed25519 key pair per site, one HMAC secret per pair of sites.

Layout written by `transferd keygen --sites A,B --out DIR`:
    DIR/<site>.ed25519      private signing key (PKCS#8 PEM, mode 0600)
    DIR/<site>.pub          public key (32 bytes, hex) that peers verify manifests with
    DIR/<a>--<b>.hmac       shared request-auth secret for the pair (names sorted; a--a is the
                            site's own secret, used by its CLI to talk to its daemon)
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from transferd.errors import AuthError, ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = ["Keyring", "LocalSecret", "keygen", "pair_secret_name"]


def pair_secret_name(a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"{lo}--{hi}.hmac"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def keygen(sites: list[str], out: Path, *, overwrite: bool = False) -> list[Path]:
    """Create keys for every site and a secret for every pair (and each site with itself).

    Existing files are kept unless `overwrite`, so adding a site to a deployment does not rotate
    the keys the others already use.
    """
    if len(set(sites)) != len(sites) or not sites:
        raise ConfigError("keygen: --sites must list distinct site ids")
    from netplan.ids import check_site_id  # (pydantic: not on the clients' light path)

    for site in sites:  # before anything is written: an id names files ('../x' led out of out)
        try:
            check_site_id(site)
        except ValueError as exc:
            raise ConfigError(f"keygen: --sites: {exc}") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write_keys(sites, out, overwrite)
    except OSError as exc:
        raise ConfigError(f"keygen: cannot write keys to {out}: {exc.strerror or exc}") from exc


def _write_keys(sites: list[str], out: Path, overwrite: bool) -> list[Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    written: list[Path] = []
    for site in sites:
        priv_path, pub_path = out / f"{site}.ed25519", out / f"{site}.pub"
        if priv_path.exists() and not overwrite:
            continue
        key = Ed25519PrivateKey.generate()
        _write_private(
            priv_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        pub_path.write_text(pub.hex() + "\n")
        written += [priv_path, pub_path]
    for i, a in enumerate(sites):
        for b in sites[i:]:
            path = out / pair_secret_name(a, b)
            if path.exists() and not overwrite:
                continue
            _write_private(path, (secrets.token_hex(32) + "\n").encode())
            written.append(path)
    return written


@dataclass
class Keyring:
    """This site's signing key, its peers' verify keys and the pair secrets, loaded once."""

    site: str
    signing_key: Ed25519PrivateKey
    verify_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)  # peer site (or own) -> HMAC secret

    @classmethod
    def load(cls, keys_dir: Path, site: str, peers: list[str]) -> Keyring:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (
            Ed25519PrivateKey,
            Ed25519PublicKey,
        )

        try:
            priv = serialization.load_pem_private_key(
                (keys_dir / f"{site}.ed25519").read_bytes(), password=None
            )
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"keys_dir: cannot load {site}.ed25519 from {keys_dir} "
                f"(run `transferd keygen --sites ... --out {keys_dir}`): {exc}"
            ) from exc
        if not isinstance(priv, Ed25519PrivateKey):
            raise ConfigError(f"keys_dir: {site}.ed25519 is not an Ed25519 key")
        ring = cls(site=site, signing_key=priv)
        for other in [site, *peers]:
            try:
                pub_hex = (keys_dir / f"{other}.pub").read_text().strip()
                ring.verify_keys[other] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_hex))
                secret_hex = (keys_dir / pair_secret_name(site, other)).read_text().strip()
                ring.secrets[other] = bytes.fromhex(secret_hex)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"keys_dir: missing or bad key material for site {other}: {exc}"
                ) from exc
        return ring

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message)

    def verify(self, site: str, message: bytes, signature: bytes) -> None:
        from cryptography.exceptions import InvalidSignature

        key = self.verify_keys.get(site)
        if key is None:
            raise AuthError(f"no verify key for site {site!r}", status=403, site=site)
        try:
            key.verify(signature, message)
        except InvalidSignature as exc:
            raise AuthError(
                f"manifest signature from {site!r} does not verify", status=403
            ) from exc

    def secret_for(self, site: str) -> bytes:
        secret = self.secrets.get(site)
        if secret is None:
            raise AuthError(f"unknown site {site[:64]!r}", status=401, site=site[:64])
        return secret


@dataclass(frozen=True)
class LocalSecret:
    """A site's secret with itself: all its CLI needs to sign requests to its own daemon
    (`protocol.auth.local_signer`). Loading the whole Keyring would import `cryptography` for
    the Ed25519 key, a sixth of the start-up of every `transferd send`."""

    site: str
    secret: bytes

    @classmethod
    def load(cls, keys_dir: Path, site: str) -> LocalSecret:
        path = keys_dir / pair_secret_name(site, site)
        try:
            return cls(site, bytes.fromhex(path.read_text().strip()))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"keys_dir: cannot load {path.name} from {keys_dir} "
                f"(run `transferd keygen --sites ... --out {keys_dir}`): {exc}"
            ) from exc

    def secret_for(self, site: str) -> bytes:
        if site != self.site:
            raise AuthError(f"unknown site {site[:64]!r}", status=401, site=site[:64])
        return self.secret
