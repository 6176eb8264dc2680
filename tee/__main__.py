"""`python -m hyperbroker.tee`: the same as `hyperbroker tee-serve`."""

import sys

from hyperbroker.tee.server import main

sys.exit(main())
