"""Path policy and request authentication, without sockets: time is a parameter."""

from __future__ import annotations

from pathlib import Path

import pytest

from transferd.errors import AuthError, ConfigError, PolicyViolation
from transferd.protocol.auth import EMPTY_BODY_BLAKE3, NonceGuard, authenticate, sign_headers
from transferd.protocol.policy import (
    check_may_leave_site,
    check_not_raw_inode,
    check_resolved,
    normalize_rel_path,
)
from transferd.site.keys import Keyring, keygen
from transferd.site.storage import confine
from transferd.testing import FakeClock


@pytest.mark.parametrize(
    ("path", "clean"),
    [
        ("curated/a/b.bin", "curated/a/b.bin"),
        ("curated//a/./b", "curated/a/b"),
        ("checkpoints/r/1/", "checkpoints/r/1"),
    ],
)
def test_clean_paths_normalize(path: str, clean: str) -> None:
    assert normalize_rel_path(path) == clean


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../x", "escapes"),
        ("curated/../../x", "escapes"),
        ("/etc/passwd", "absolute"),
        ("C:/x", "absolute"),
        ("", "non-empty"),
        ("a\x00b", "non-empty"),
        ("home/x", "not under a tier"),
        (".transferd/journal.sqlite", "not under a tier"),
    ],
)
def test_escaping_or_tierless_paths_are_refused(path: str, reason: str) -> None:
    with pytest.raises(PolicyViolation, match=reason):
        normalize_rel_path(path)


def test_raw_tier_never_leaves_but_other_tiers_do() -> None:
    with pytest.raises(PolicyViolation, match="raw-tier"):
        check_may_leave_site("raw/sensors/day1.parquet")
    assert check_may_leave_site("approved/model.bin") == "approved"
    assert check_may_leave_site("checkpoints/run1/step-3") == "checkpoints"


def test_symlink_leading_out_of_data_dir_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "curated").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "curated" / "inside").mkdir()
    (root / "curated" / "out").symlink_to(tmp_path / "secret")
    assert confine(root, "curated/inside/x") == root.resolve() / "curated/inside/x"
    with pytest.raises(PolicyViolation, match="symlink"):
        confine(root, "curated/out/x")


@pytest.fixture
def rings(tmp_path: Path) -> tuple[Keyring, Keyring]:
    keygen(["A", "B"], tmp_path)
    return Keyring.load(tmp_path, "A", ["B"]), Keyring.load(tmp_path, "B", ["A"])


def _signed(
    ring: Keyring, clock: FakeClock, path: str = "/v1/uploads", dst: str = "B"
) -> dict[str, str]:
    return sign_headers(
        ring.secret_for("B"),
        method="POST",
        path_qs=path,
        body_blake3=EMPTY_BODY_BLAKE3,
        src="A",
        dst=dst,
        now=clock(),
    )


def test_signed_request_authenticates_once_then_is_a_replay(rings: tuple[Keyring, Keyring]) -> None:
    a, b = rings
    clock = FakeClock()
    guard = NonceGuard(window_s=300, not_before=clock() - 1)
    headers = _signed(a, clock)
    auth = authenticate(
        headers, method="POST", path_qs="/v1/uploads", keys=b, guard=guard, now=clock()
    )
    assert auth.site == "A"
    with pytest.raises(AuthError, match="replayed"):
        authenticate(
            headers, method="POST", path_qs="/v1/uploads", keys=b, guard=guard, now=clock()
        )


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: h.pop("X-Transferd-Signature"), "unsigned"),
        (lambda h: h.update({"X-Transferd-Signature": "0" * 64}), "bad request signature"),
        (lambda h: h.update({"X-Transferd-Body-Blake3": "1" * 64}), "bad request signature"),
        (lambda h: h.update({"X-Transferd-Timestamp": "nan"}), "malformed timestamp"),
        (lambda h: h.update({"X-Transferd-Site": "C"}), "unknown site"),
    ],
)
def test_tampered_or_unsigned_requests_are_401(
    rings: tuple[Keyring, Keyring], mutate, reason: str
) -> None:
    a, b = rings
    clock = FakeClock()
    headers = _signed(a, clock)
    mutate(headers)
    with pytest.raises(AuthError, match=reason) as err:
        authenticate(
            headers,
            method="POST",
            path_qs="/v1/uploads",
            keys=b,
            guard=NonceGuard(300, 0),
            now=clock(),
        )
    assert err.value.http_status == 401


def test_signature_covers_the_path(rings: tuple[Keyring, Keyring]) -> None:
    a, b = rings
    clock = FakeClock()
    with pytest.raises(AuthError, match="bad request signature"):
        authenticate(
            _signed(a, clock, path="/v1/uploads/x/have"),
            method="POST",
            path_qs="/v1/uploads/y/have",
            keys=b,
            guard=NonceGuard(300, 0),
            now=clock(),
        )


def test_stale_requests_and_those_signed_before_start_are_refused(
    rings: tuple[Keyring, Keyring],
) -> None:
    a, b = rings
    clock = FakeClock()
    headers = _signed(a, clock)
    clock.advance(301)
    with pytest.raises(AuthError, match="stale"):
        authenticate(
            headers,
            method="POST",
            path_qs="/v1/uploads",
            keys=b,
            guard=NonceGuard(300, 0),
            now=clock(),
        )
    # A restarted daemon forgets nonces, so it refuses anything signed before it started.
    fresh = _signed(a, clock)
    restarted = NonceGuard(300, not_before=clock() + 0.5)
    with pytest.raises(AuthError, match="before this daemon started"):
        authenticate(
            fresh, method="POST", path_qs="/v1/uploads", keys=b, guard=restarted, now=clock() + 1
        )


def test_a_request_cannot_be_reflected_to_its_sender(rings: tuple[Keyring, Keyring]) -> None:
    a, _b = rings
    clock = FakeClock()
    with pytest.raises(AuthError, match="addressed to site 'B'"):
        authenticate(
            _signed(a, clock),
            method="POST",
            path_qs="/v1/uploads",
            keys=a,
            guard=NonceGuard(300, 0),
            now=clock(),
        )


def test_keygen_into_a_path_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "keys"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write keys"):
        keygen(["A", "B"], blocker)
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("bad", ["../x", "b c", "A\n", "é"])
def test_keygen_refuses_a_site_id_that_is_not_one_before_writing_anything(
    tmp_path: Path, bad: str
) -> None:
    """`--sites A,../x` wrote x.ed25519, x.pub and x--A.hmac beside --out, then failed
    halfway ('cannot write keys ...: No such file or directory'); 'b c' and 'é' made keys no
    site config can use (the site-id rule refuses them there)."""
    out = tmp_path / "deploy" / "keys"
    with pytest.raises(ConfigError, match=r"keygen: --sites: .* is not a site id: 1-64 letters"):
        keygen(["A", bad], out)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == []


class _Memory:
    """A ReplayMemory in a dict, as the journal keeps it."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.nonces: dict[str, float] = {}
        self.writes = 0

    def auth_marks(self) -> dict[str, float]:
        return dict(self.marks)

    def future_nonces(self, since: float) -> dict[str, float]:
        return {n: t for n, t in self.nonces.items() if t >= since}

    def set_auth_mark(self, site: str, ts: float) -> None:
        self.writes += 1
        self.marks[site] = max(ts, self.marks.get(site, ts))

    def add_future_nonce(self, nonce: str, ts: float) -> None:
        self.writes += 1
        self.nonces[nonce] = ts


def test_replay_memory_survives_a_restart_and_is_written_once_a_second() -> None:
    memory = _Memory()
    guard = NonceGuard(300, not_before=0, memory=memory)
    now = 1000.0
    for i in range(100):  # 100 requests over 5 s, dated now: 5-6 mark writes, not 100
        guard.check_and_record(now + i * 0.05, f"{i:032x}", now + i * 0.05, "A")
    assert 5 <= memory.writes <= 6
    # Dated 250 s ahead (inside the window): its nonce is kept, not a mark 250 s ahead.
    guard.check_and_record(now + 250, "f" * 32, now + 5, "A")
    assert memory.nonces == {"f" * 32: now + 250}
    assert memory.marks["A"] < now + 10
    restarted = NonceGuard(300, not_before=0, memory=memory)
    with pytest.raises(AuthError, match="before this daemon restarted") as before:
        restarted.check_and_record(now + 4.0, "e" * 32, now + 7, "A")
    assert before.value.transient
    with pytest.raises(AuthError, match="replayed"):
        restarted.check_and_record(now + 250, "f" * 32, now + 7, "A")
    # A's genuine new requests, and other sites, are accepted.
    restarted.check_and_record(now + 7, "d" * 32, now + 7, "A")
    restarted.check_and_record(now + 3, "c" * 32, now + 7, "B")


@pytest.mark.parametrize(
    ("rel", "resolved", "reason"),
    [
        ("curated/x", None, "outside data_dir"),
        ("curated/x", "", "data_dir itself"),
        ("curated/x", ".transferd/journal.sqlite", "out of the tier folders"),
        ("curated/x", "raw/secret.bin", "into raw/"),
        ("checkpoints/run6/step-1", "raw/step-1", "into raw/"),
    ],
)
def test_a_path_is_refused_for_where_it_resolves(
    rel: str, resolved: str | None, reason: str
) -> None:
    with pytest.raises(PolicyViolation, match=reason):
        check_resolved(rel, resolved)


@pytest.mark.parametrize(
    ("rel", "resolved"),
    [("curated/x", "curated/x"), ("curated/x", "approved/y"), ("raw/a", "raw/b")],
)
def test_links_within_the_tiers_and_within_raw_are_fine(rel: str, resolved: str) -> None:
    check_resolved(rel, resolved)


def test_a_hard_link_to_raw_data_may_not_leave() -> None:
    with pytest.raises(PolicyViolation, match="hard link to raw-tier data"):
        check_not_raw_inode("curated/h.bin", "raw/secret.bin")
    check_not_raw_inode("curated/h.bin", None)
