"""The benchmark harness: whole components as processes under generated load.

`python -m bench SCENARIO` (see bench/README.md). The harness reuses the test support
(tests/support: real nats-server, influxd, components as processes, sample lines), so
tests/ goes on sys.path here, as pytest's rootdir conftest puts it there for the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

for _path in (REPO_ROOT / "tests", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
