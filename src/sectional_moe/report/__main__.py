"""``python -m sectional_moe.report`` (see :mod:`sectional_moe.report.cli`)."""

from sectional_moe.report.cli import main

raise SystemExit(main())
