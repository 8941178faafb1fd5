"""``python -m hybridvision.deploy``: the PyTorch-free command line, :mod:`hybridvision.deploy.cli`."""

import sys

from .cli import main

sys.exit(main(prog="python -m hybridvision.deploy"))
