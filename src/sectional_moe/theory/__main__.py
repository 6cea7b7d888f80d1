"""``python -m sectional_moe.theory <command>``: see :mod:`sectional_moe.theory.cli`."""

import sys

from sectional_moe.theory.cli import main

sys.exit(main())
