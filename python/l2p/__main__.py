"""``python -m l2p`` is the ``l2p`` command."""

import sys

from l2p.cli import main

sys.exit(main())
