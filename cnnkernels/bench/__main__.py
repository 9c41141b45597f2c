"""`python -m cnnkernels.bench`: the same as the `cnnkernels-bench` command."""
import sys

from cnnkernels.bench.cli import main

sys.exit(main())
