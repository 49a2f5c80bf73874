"""The directory that holds the `batchdb` package: the repository root in a checkout or an
editable install, site-packages in a wheel install.

Child processes (workers, the simulator, Streamlit) get it first on PYTHONPATH so that they run
this very code whatever their working directory and whatever else is installed (a test run with
PYTHONPATH pointing at a worktree, say). It is computed from this file, a real file in batchdb/,
not from modules reached through the batchdb/workers, batchdb/dashboard or batchdb/dagster
symlinks: resolving those lands in the repository's top-level folders in a checkout but inside
site-packages/batchdb in a wheel, one level off.
"""

from __future__ import annotations

from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent
