"""`python -m deployments.ha_stack [register-block-types]` (deployments/ha_stack/cli.py)."""

import sys

from deployments.ha_stack.cli import main

sys.exit(main())
