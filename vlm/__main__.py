"""`python -m vlm …` (and `torchrun -m vlm …`) run the CLI."""

import sys

from vlm.cli import main

sys.exit(main())
