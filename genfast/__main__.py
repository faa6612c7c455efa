"""``python -m genfast``: the ``genfast`` command."""
import sys

from .cli import main

sys.exit(main())
