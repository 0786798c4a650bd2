"""Site policy where data moves: tiers and path confinement, enforced on both sides of a transfer.

Everything is addressed by a POSIX path relative to data_dir whose first component is its top
folder: a dataset tier (`netplan.plan.Tier`: raw, curated, approved) or `checkpoints/`.
`raw/` never leaves its site; no path may escape data_dir (`..` or absolute here).

A path is what it resolves to. The storage backend follows symlinks (`site.storage.confine`)
and hands the real location to `check_resolved`: outside data_dir, or outside every tier
folder, is refused; a path outside raw/ that resolves into raw/ is refused whatever reads or
writes it (sending it would let raw data leave; receiving into it would write into raw/). A
hard link is the same file under two names: a file about to leave whose inode also has a
name under raw/ is refused too (`check_not_raw_inode`). Both the sender (before reading) and
the receiver (before writing) call these checks.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from netplan.plan import Tier, TrafficClass
from transferd.errors import PolicyViolation

__all__ = [
    "CHECKPOINTS",
    "TOP_FOLDERS",
    "check_may_leave_site",
    "check_not_raw_inode",
    "check_resolved",
    "normalize_rel_path",
    "tier_of",
    "top_folder",
    "traffic_class_for",
]

CHECKPOINTS = "checkpoints"  # checkpoints/<run>/<step>/: training state, not a dataset tier
TOP_FOLDERS = (*(t.value for t in Tier), CHECKPOINTS)

_MAX_PATH_CHARS = 4096


def normalize_rel_path(path: str) -> str:
    """Check that `path` is a clean relative path inside data_dir and return it in POSIX form.

    Refuses (PolicyViolation) absolute paths, `..` components, empty or NUL-bearing names, and
    paths whose top folder is not a tier. Never touches the filesystem.
    """
    if not isinstance(path, str) or not path or len(path) > _MAX_PATH_CHARS or "\x00" in path:
        raise PolicyViolation("path must be a non-empty relative path", path=repr(path)[:200])
    if (
        path.startswith(("/", "\\"))
        or PurePosixPath(path).is_absolute()
        or (len(path) > 1 and path[1] == ":")
    ):
        raise PolicyViolation(f"absolute path refused: {path!r}", path=path)
    parts = path.replace("\\", "/").split("/")
    clean = [p for p in parts if p not in ("", ".")]
    if any(p == ".." for p in clean):
        raise PolicyViolation(f"path escapes data_dir: {path!r}", path=path)
    if not clean:
        raise PolicyViolation("path must name something inside a tier", path=path)
    top_folder("/".join(clean))
    return "/".join(clean)


def top_folder(rel_path: str) -> str:
    """The path's top folder (a tier or checkpoints); PolicyViolation for anything else."""
    top = rel_path.split("/", 1)[0]
    if top not in TOP_FOLDERS:
        folders = ", ".join(f"{t}/" for t in TOP_FOLDERS)
        raise PolicyViolation(f"{rel_path!r} is not under a tier folder ({folders})", path=rel_path)
    return top


def tier_of(rel_path: str) -> Tier | None:
    """The dataset tier a path is in (None under checkpoints/)."""
    top = top_folder(rel_path)
    return None if top == CHECKPOINTS else Tier(top)


def check_may_leave_site(rel_path: str) -> str:
    """The sender-side rule: raw-tier data never leaves its site, whoever asks. Returns the
    path's top folder."""
    if tier_of(rel_path) is Tier.RAW:
        raise PolicyViolation(f"raw-tier data may not leave its site: {rel_path!r}", path=rel_path)
    return top_folder(rel_path)


def traffic_class_for(rel_path: str) -> TrafficClass:
    """The bulk class a path travels on unless a plan says otherwise: checkpoints/ on the
    checkpoint class, every dataset tier on sync."""
    return TrafficClass.CHECKPOINT if top_folder(rel_path) == CHECKPOINTS else TrafficClass.SYNC


def check_resolved(rel_path: str, resolved: str | None) -> None:
    """The rule on where `rel_path` really is: `resolved` is its location with every symlink
    followed, relative to data_dir ("" for data_dir itself), or None when it lies outside.
    PolicyViolation when it leads out of data_dir or out of the tier folders, or from outside
    raw/ into raw/."""
    if resolved is None:
        raise PolicyViolation(
            f"path leads outside data_dir through a symlink: {rel_path!r}", path=rel_path
        )
    if resolved == "":
        raise PolicyViolation(f"path resolves to data_dir itself: {rel_path!r}", path=rel_path)
    top = resolved.split("/", 1)[0]
    if top not in TOP_FOLDERS:
        raise PolicyViolation(
            f"path leads out of the tier folders through a link: {rel_path!r} resolves to "
            f"{resolved!r}",
            path=rel_path,
        )
    if top == Tier.RAW.value and top_folder(rel_path) != Tier.RAW.value:
        raise PolicyViolation(
            f"path leads into raw/ through a link: {rel_path!r} resolves to {resolved!r}",
            path=rel_path,
        )


def check_not_raw_inode(rel_path: str, raw_name: str | None) -> None:
    """The hard-link rule for data about to leave: `raw_name` is a name under raw/ that the
    same file (inode) has, or None. PolicyViolation when there is one."""
    if raw_name is not None and top_folder(rel_path) != Tier.RAW.value:
        raise PolicyViolation(
            f"{rel_path!r} is a hard link to raw-tier data ({raw_name!r}) and may not leave "
            "its site",
            path=rel_path,
        )
