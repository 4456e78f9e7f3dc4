"""Run every notebook in `nbs/` as a pytest test, so CI prints a pytest summary.

Cells flagged with a `tst_flags` flag (`#| slow`, `#| notest`) are skipped unless listed in
`LATENTCOT_NB_FLAGS` (space separated), e.g. `LATENTCOT_NB_FLAGS=slow pytest tests/test_notebooks.py`.
"""
import os
from pathlib import Path

import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_nb

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


@pytest.mark.parametrize("nb", NBS, ids=[p.name for p in NBS])
def test_notebook(nb):
    cfg = get_config(ROOT)
    skip = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)
    force = os.environ.get("LATENTCOT_NB_FLAGS", "").split()
    ok, secs = run_nb(nb, skip_flags=[f for f in skip if f not in force], force_flags=force,
                      basepath=str(ROOT), cell_timeout=1200)
    assert ok, f"notebook {nb.name} failed (traceback above)"
