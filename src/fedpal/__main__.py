"""``python -m fedpal`` runs the command-line interface."""

import sys

from fedpal.cli import main

sys.exit(main())
