"""`python -m manzano_edge.cli` (and `torchrun -m manzano_edge.cli`)."""

import sys

from manzano_edge.cli import main

sys.exit(main())
