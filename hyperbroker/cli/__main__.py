"""`python -m hyperbroker.cli`: the same as the `hyperbroker` script."""

import sys

from hyperbroker.cli.main import main

sys.exit(main())
