"""``python -m genfast.bench [options]``: the same as ``genfast bench``."""
import sys

from .cli import main

sys.exit(main())
