"""Speed, memory and quality measurements (results under benchmarks/results/). Importing this package brings in
the wings, so the benchmarks run from a source tree that is not installed (the GPU machine's `make gpu-check`)."""

import fastattn  # noqa: F401
import formats  # noqa: F401
import parallel  # noqa: F401
import quant  # noqa: F401
import sessions  # noqa: F401
