"""Install and cache the offline models and data sets: ``python scripts/fetch_assets.py [--only A ..]``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("ortho_adapters") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ortho_adapters.fetch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
