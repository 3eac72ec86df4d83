"""`python -m engine.cli ...` runs the `wafer` command."""

import sys

from engine.cli.main import main

sys.exit(main())
