"""``python -m cabs_experiments``: see :func:`cabs_experiments.run.main`."""

import sys

from .run import main

sys.exit(main())
