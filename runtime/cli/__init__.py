"""The `molmo-edge` command line: `main` parses and dispatches; one module per command group.

The only part of the package allowed to import `export` and `calibration`, and only inside the
command that needs them, so `molmo-edge --help` stays fast and the runtime stays torch-free.
"""
from molmo_edge.runtime.cli.main import main

__all__ = ["main"]
