"""`python -m tee`: the same as `hyperbroker tee-serve`."""

import sys

from tee.server import main

sys.exit(main())
