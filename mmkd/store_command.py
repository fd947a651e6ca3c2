"""`mmkd store list|gc ROOT`: show the teacher store entries in ROOT (distill.cache_dir, default
RUN_DIR/teacher_cache), and remove the partial builds that no process is building.

A killed or failed build leaves `ROOT/<key>.partial/`; the next run with the same key resumes
it, so it is kept until `gc` removes it. A partial whose builder still holds its lock
(`ROOT/<key>.lock`) is shown as "building" and never removed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from mmkd.cli import command_parser
from mmkd.errors import CheckpointError, ConfigError
from mmkd.store import TeacherStore


@dataclass
class Entry:
    path: Path
    kind: str  # "entry" | "partial" | "lock"
    state: str
    size: int  # bytes on disk

    def line(self) -> str:
        return f"{self.kind:8s} {self.state:22s} {self.size / 1e6:10.1f} MB  {self.path.name}"


def disk_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def building(root: Path, key: str) -> bool:
    """True when a live process holds the builder's lock of `key`."""
    path = root / f"{key}.lock"
    if not path.exists():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def partial_state(path: Path) -> str:
    try:
        layout = json.loads((path / "layout.json").read_text())
        total = -(-int(layout["count"]) // int(layout["chunk_size"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return "resumable (no layout)"
    done = len(list((path / "chunks").glob("*.done"))) if (path / "chunks").is_dir() else 0
    return f"{done}/{total} chunks done"


def scan(root: Path, verify: bool) -> list[Entry]:
    if not root.is_dir():
        raise ConfigError(f"mmkd store: {root} is not a folder")
    entries = []
    for path in sorted(root.iterdir()):
        if path.name.endswith(".partial") and path.is_dir():
            key = path.name[: -len(".partial")]
            state = "building" if building(root, key) else partial_state(path)
            entries.append(Entry(path, "partial", state, disk_bytes(path)))
        elif path.suffix == ".lock":
            state = "held" if building(root, path.stem) else "stale"
            entries.append(Entry(path, "lock", state, disk_bytes(path)))
        elif (path / "meta.json").is_file():
            try:
                store = TeacherStore.open(path, verify=verify)
                state = f"{len(store)} x {store.views} views" + (", verified" if verify else "")
            except CheckpointError as err:
                state = f"damaged: {str(err).split(': ', 1)[-1][:40]}"
            entries.append(Entry(path, "entry", state, disk_bytes(path)))
    return entries


def command(argv: Sequence[str]) -> int:
    """`mmkd store list ROOT [--verify]` | `mmkd store gc ROOT [--dry-run]`."""
    parser = command_parser("store", "List teacher store entries, or remove partial builds.")
    parser.add_argument("action", choices=("list", "gc"))
    parser.add_argument("root", help="the store folder (distill.cache_dir)")
    parser.add_argument("--verify", action="store_true", help="list: check every checksum")
    parser.add_argument("--dry-run", action="store_true", help="gc: say what would go")
    args = parser.parse_args(argv)
    entries = scan(Path(args.root), args.verify)
    if args.action == "list":
        for entry in entries:
            print(entry.line())
        return 0
    freed = 0
    for entry in entries:
        if entry.kind == "entry" or entry.state in ("building", "held"):
            continue
        print(("would remove " if args.dry_run else "removed ") + entry.line())
        if not args.dry_run:
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink(missing_ok=True)
        freed += entry.size
    print(f"{'would free' if args.dry_run else 'freed'} {freed / 1e6:.1f} MB")
    return 0
