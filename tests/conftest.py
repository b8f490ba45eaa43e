"""Fixtures shared by the test files: the disk snapshot that proves a refused call wrote nothing."""
import hashlib
import os
import stat
from pathlib import Path

import pytest


def _snapshot(root: Path) -> dict:
    "Every entry under `root`: relative path -> (kind, size, mtime_ns, sha256 of the content or None)."
    root, out = Path(root), {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if kind == "file" else None
            out[str(p.relative_to(root))] = (kind, st.st_size if kind == "file" else None, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def snapshot():
    "`snapshot(d)`: every entry under `d`; equal before and after a refused call means nothing was written."
    return _snapshot
