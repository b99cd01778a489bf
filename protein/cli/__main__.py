"""`python -m protein.cli`: how torchrun starts each rank of `protein train --nproc`."""

import sys

from protein.cli import main

sys.exit(main())
