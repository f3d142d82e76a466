"""``python -m rkfast``: the ``rkfast`` command line."""

from .cli import main

raise SystemExit(main())
