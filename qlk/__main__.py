"""``python -m qlk``: the ``qlk`` command (see :mod:`qlk.cli`); under torchrun each rank ends by
:func:`qlk.cli.exit_process`."""
from .cli import exit_process, main

exit_process(main())
