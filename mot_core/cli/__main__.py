"""``python -m mot_core.cli``: the same as the ``mot`` command."""

import sys

from mot_core.cli import main

sys.exit(main())
