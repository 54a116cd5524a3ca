"""``python -m soaplab``: the ``soaplab`` command."""

from soaplab.cli import main

raise SystemExit(main())
