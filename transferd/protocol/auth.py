"""Request authentication between daemons: HMAC-SHA256 with a per-pair secret.

The signature covers method, path (with query), the blake3 of the body, timestamp, nonce, and the
sending and receiving site ids (so a request cannot be reflected back to its sender, who holds
the same pair secret). Every send of a request is signed afresh (a retry, or the HTTP client
re-sending on a dropped kept-alive connection, gets a new nonce and timestamp). The receiver
rejects stale timestamps (outside the window) and nonces it has already seen inside the window;
`NonceGuard` takes `now` as a parameter.

Replays across a restart: the nonces seen are kept in memory, and a `ReplayMemory` (the
journal) keeps what must survive a restart, written before the request is acted upon:
- per sending site a high-water mark, the newest timestamp accepted from it rounded up by
  MARK_STEP_S (so it is written at most once a second per site); a restarted daemon refuses
  from each site anything signed at or before its mark;
- the nonce itself of a request dated ahead of this daemon's clock by more than MARK_STEP_S
  (a peer whose clock runs ahead, or a forged date inside the allowed skew): a mark there
  would refuse that site's genuine requests for as long as the skew, so the nonce is kept, for
  the window, and refused after a restart like any other seen nonce.
Timestamps older than the daemon's start are refused too (a state dir that was wiped). These
refusals are transient: the sender signs its retry afresh.

Replies are signed too (`sign_reply`): an HMAC over the request's nonce, the status and the
reply body's blake3, so a reply damaged in flight (or forged) is caught by the caller
(`check_reply_signature`) and the request retried, rather than trusted or taken for a refusal.

`RequestVerifier` says who may call what: the peer API answers the configured peers, the local
API only the site's own CLI (signed with the site's own secret). Key material comes in through
the `Keys` protocol (`site.keys.Keyring` loads it from keys_dir).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from transferd.errors import AuthError, IntegrityError
from transferd.protocol.chunks import blake3_hex

__all__ = [
    "EMPTY_BODY_BLAKE3",
    "MARK_STEP_S",
    "AuthHeaders",
    "Keys",
    "LocalSigner",
    "NonceGuard",
    "PairSecrets",
    "ReplayMemory",
    "RequestVerifier",
    "authenticate",
    "body_blake3",
    "check_reply_signature",
    "local_signer",
    "sign_headers",
    "sign_reply",
]

H_SITE = "X-Transferd-Site"
H_TO = "X-Transferd-To"
H_TS = "X-Transferd-Timestamp"
H_NONCE = "X-Transferd-Nonce"
H_BODY = "X-Transferd-Body-Blake3"
H_SIG = "X-Transferd-Signature"
H_REPLY_BODY = "X-Transferd-Reply-Blake3"
H_REPLY_SIG = "X-Transferd-Reply-Signature"

MARK_STEP_S = 1.0  # a site's persisted high-water mark runs this far ahead of what it covers

EMPTY_BODY_BLAKE3 = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NONCE = re.compile(r"^[0-9a-f]{32}$")


class PairSecrets(Protocol):
    """A site's id and the HMAC secret it shares with each site it knows (itself included)."""

    @property
    def site(self) -> str: ...

    def secret_for(self, site: str) -> bytes:
        """The pair secret shared with `site`; AuthError (401) for an unknown site."""
        ...


class Keys(PairSecrets, Protocol):
    """A site's key material: its pair secrets, its Ed25519 signing key and its peers' verify
    keys."""

    def sign(self, message: bytes) -> bytes: ...

    def verify(self, site: str, message: bytes, signature: bytes) -> None:
        """Check `site`'s Ed25519 signature of `message`; AuthError (403) otherwise."""
        ...


def body_blake3(body: bytes | memoryview | None) -> str:
    return EMPTY_BODY_BLAKE3 if body is None else blake3_hex(body)


def _string_to_sign(
    method: str, path_qs: str, body_blake3: str, ts: str, nonce: str, src: str, dst: str
) -> bytes:
    return "\n".join(
        ["TRANSFERD-HMAC-SHA256", method.upper(), path_qs, body_blake3, ts, nonce, src, dst]
    ).encode()


def sign_headers(
    secret: bytes, *, method: str, path_qs: str, body_blake3: str, src: str, dst: str, now: float
) -> dict[str, str]:
    ts = f"{now:.3f}"
    nonce = secrets.token_hex(16)
    mac = hmac.new(
        secret, _string_to_sign(method, path_qs, body_blake3, ts, nonce, src, dst), hashlib.sha256
    ).hexdigest()
    return {H_SITE: src, H_TO: dst, H_TS: ts, H_NONCE: nonce, H_BODY: body_blake3, H_SIG: mac}


LocalSigner = Callable[[str, str, bytes | None], dict[str, str]]
"""Headers for a request to this site's own daemon: (method, path_qs, body) -> headers."""


def local_signer(keys: PairSecrets, clock: Callable[[], float] = time.time) -> LocalSigner:
    """Signs requests to this site's own daemon as its CLI does (the site's own pair secret):
    `local_signer(LocalSecret.load(keys_dir, site))`, or a whole Keyring."""
    secret = keys.secret_for(keys.site)

    def sign(method: str, path_qs: str, body: bytes | None) -> dict[str, str]:
        return sign_headers(
            secret,
            method=method,
            path_qs=path_qs,
            body_blake3=body_blake3(body),
            src=keys.site,
            dst=keys.site,
            now=clock(),
        )

    return sign


class ReplayMemory(Protocol):
    """Where a NonceGuard keeps what must survive a restart (the site journal)."""

    def auth_marks(self) -> dict[str, float]: ...
    def future_nonces(self, since: float) -> dict[str, float]: ...
    def set_auth_mark(self, site: str, ts: float) -> None: ...
    def add_future_nonce(self, nonce: str, ts: float) -> None: ...


class NonceGuard:
    """Remembers nonces seen within the window; refuses stale and replayed requests, and after
    a restart (with `memory`) anything a site signed at or before its high-water mark, and the
    nonces of requests dated ahead of this daemon's clock."""

    def __init__(
        self,
        window_s: float,
        not_before: float,
        max_entries: int = 1_000_000,
        *,
        memory: ReplayMemory | None = None,
    ) -> None:
        self.window_s = window_s
        self.not_before = not_before
        self.max_entries = max_entries
        self.memory = memory
        self.restored = memory.auth_marks() if memory is not None else {}
        self.marks = dict(self.restored)
        self._seen: OrderedDict[str, float] = OrderedDict()  # in arrival order (~ ts order)
        # Nonces dated ahead of this clock: few, kept apart so they never hold up pruning.
        self._ahead: dict[str, float] = (
            memory.future_nonces(since=not_before - window_s) if memory is not None else {}
        )

    def check_and_record(self, ts: float, nonce: str, now: float, site: str = "") -> None:
        if abs(now - ts) > self.window_s:
            raise AuthError(f"stale request: timestamp is {now - ts:+.0f}s from now", status=401)
        if ts < self.not_before:
            raise AuthError(
                "stale request: signed before this daemon started", status=401, transient=True
            )
        if site in self.restored and ts <= self.restored[site]:
            raise AuthError(
                "stale request: signed before this daemon restarted", status=401, transient=True
            )
        self._prune(now)
        if nonce in self._seen or nonce in self._ahead:
            raise AuthError("replayed request: nonce already used", status=401, transient=True)
        if len(self._seen) + len(self._ahead) >= self.max_entries:
            raise AuthError("too many requests inside the replay window", status=401)
        if self.memory is not None:
            if ts > now + MARK_STEP_S:
                self.memory.add_future_nonce(nonce, ts)
            elif ts > self.marks.get(site, float("-inf")):
                self.memory.set_auth_mark(site, ts + MARK_STEP_S)
                self.marks[site] = ts + MARK_STEP_S
        if ts > now + MARK_STEP_S:
            self._ahead[nonce] = ts
        else:
            self._seen[nonce] = ts

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._seen:
            nonce, ts = next(iter(self._seen.items()))
            if ts >= horizon:
                break
            self._seen.popitem(last=False)
        if self._ahead and min(self._ahead.values()) < horizon:
            self._ahead = {n: t for n, t in self._ahead.items() if t >= horizon}


@dataclass(frozen=True)
class AuthHeaders:
    """An authenticated request: who sent it and the blake3 its body must have."""

    site: str
    body_blake3: str
    nonce: str = ""

    def check_body(self, body: bytes | memoryview) -> None:
        """The body read must be the one signed (IntegrityError: damaged or swapped)."""
        if blake3_hex(body) != self.body_blake3:
            raise IntegrityError(
                "request body damaged in flight (does not match its signed blake3)",
                transient=True,
            )


def authenticate(
    headers: Mapping[str, str],
    *,
    method: str,
    path_qs: str,
    keys: Keys,
    guard: NonceGuard,
    now: float,
) -> AuthHeaders:
    """Check a request's signature headers (not yet its body: the caller compares the body's
    blake3 with `body_blake3` once it has read it). Raises AuthError (401)."""
    try:
        src, dst = headers[H_SITE], headers[H_TO]
        ts_text, nonce, body, sig = headers[H_TS], headers[H_NONCE], headers[H_BODY], headers[H_SIG]
    except KeyError as exc:
        raise AuthError(f"unsigned request: header {exc.args[0]} missing", status=401) from None
    if dst != keys.site:
        raise AuthError(f"request is addressed to site {dst[:64]!r}, not this one", status=401)
    if not (_HEX64.match(body) and _NONCE.match(nonce) and _HEX64.match(sig)):
        raise AuthError("malformed signature headers", status=401)
    try:
        ts = float(ts_text)
    except ValueError:
        raise AuthError("malformed timestamp", status=401) from None
    if ts != ts:  # NaN
        raise AuthError("malformed timestamp", status=401)
    secret = keys.secret_for(src)
    expected = hmac.new(
        secret, _string_to_sign(method, path_qs, body, ts_text, nonce, src, dst), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, sig):
        raise AuthError("bad request signature", status=401)
    guard.check_and_record(ts, nonce, now, src)
    return AuthHeaders(site=src, body_blake3=body, nonce=nonce)


def _reply_mac(secret: bytes, nonce: str, status: int, body_blake3: str) -> str:
    text = "\n".join(["TRANSFERD-REPLY", nonce, str(status), body_blake3]).encode()
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


def sign_reply(secret: bytes, nonce: str, status: int, body: bytes) -> dict[str, str]:
    """Headers that bind a reply (status and body) to the request it answers."""
    digest = body_blake3(body)
    return {H_REPLY_BODY: digest, H_REPLY_SIG: _reply_mac(secret, nonce, status, digest)}


def check_reply_signature(
    secret: bytes,
    nonce: str,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    required: bool,
) -> None:
    """A reply must carry a valid signature when `required` (an answer the caller acts on),
    and any signature it carries must be valid. IntegrityError (transient: ask again)
    otherwise."""
    mac = headers.get(H_REPLY_SIG)
    if mac is None:
        if required:
            raise IntegrityError("reply is not signed (damaged in flight?)", transient=True)
        return
    digest = headers.get(H_REPLY_BODY, "")
    expected = _reply_mac(secret, nonce, status, digest)
    if not hmac.compare_digest(expected, mac) or body_blake3(body) != digest:
        raise IntegrityError(
            "reply damaged in flight (does not match its signature)", transient=True
        )


class RequestVerifier:
    """Authenticates requests to this daemon and says who may call what."""

    def __init__(
        self, keys: Keys, guard: NonceGuard, peers: Collection[str], clock: Callable[[], float]
    ) -> None:
        self.keys = keys
        self.guard = guard
        self.peers = frozenset(peers)
        self.clock = clock

    def _authenticate(self, headers: Mapping[str, str], method: str, path_qs: str) -> AuthHeaders:
        return authenticate(
            headers,
            method=method,
            path_qs=path_qs,
            keys=self.keys,
            guard=self.guard,
            now=self.clock(),
        )

    def peer(self, headers: Mapping[str, str], method: str, path_qs: str) -> AuthHeaders:
        """A request from a configured peer (AuthError 401/403 otherwise)."""
        auth = self._authenticate(headers, method, path_qs)
        if auth.site not in self.peers:
            raise AuthError(f"site {auth.site!r} is not a peer of this site", status=403)
        return auth

    def local(self, headers: Mapping[str, str], method: str, path_qs: str) -> AuthHeaders:
        """A request from this site's own CLI (AuthError 401/403 otherwise)."""
        auth = self._authenticate(headers, method, path_qs)
        if auth.site != self.keys.site:
            raise AuthError("the local API only answers this site's own CLI", status=403)
        return auth
