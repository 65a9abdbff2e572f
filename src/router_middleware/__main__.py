"""``python -m router_middleware``: the ``router-middleware`` command."""

import sys

from .cli import main

sys.exit(main())
