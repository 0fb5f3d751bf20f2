"""Users files written by Apache's htpasswd -B (bcrypt), as an operator would write them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.servers import find_executable

HTPASSWD_INSTALL = "run scripts/setup as root (it installs apache2-utils; README: Tests)"


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """Write path with one bcrypt entry per user (replacing the file); return path."""
    exe = find_executable("htpasswd", HTPASSWD_INSTALL)
    path.unlink(missing_ok=True)
    for user, password in users.items():
        create = [] if path.exists() else ["-c"]
        # -i: the password on stdin, not in the process list
        subprocess.run(
            [exe, "-B", "-i", *create, str(path), user],
            input=password.encode(),
            capture_output=True,
            check=True,
            timeout=30,
        )
    return path
