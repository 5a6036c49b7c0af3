"""``python -m graphopt`` runs the command line."""

import sys

from graphopt.app.cli import main

sys.exit(main())
