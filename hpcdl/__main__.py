"""``python -m hpcdl`` is the ``hpcdl`` command."""

from hpcdl.cli import console_main

console_main()
