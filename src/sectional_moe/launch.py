"""``python -m sectional_moe.launch``: an alias of ``python -m sectional_moe.cluster.sbatch`` (kept for old scripts)."""

from __future__ import annotations

import sys

from sectional_moe.cluster.sbatch import main

if __name__ == "__main__":
    sys.exit(main())
