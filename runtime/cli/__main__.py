"""`python -m molmo_edge.runtime.cli` = `molmo-edge`."""
import sys

from molmo_edge.runtime.cli.main import main

sys.exit(main())
