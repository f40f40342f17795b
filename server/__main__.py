"""`python -m server`: the same as snapkv-serve."""

import sys

from server.command import main

sys.exit(main())
