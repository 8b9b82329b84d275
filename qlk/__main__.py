"""``python -m qlk``: the ``qlk`` command (see :mod:`qlk.cli`)."""
import sys

from .cli import main

sys.exit(main())
