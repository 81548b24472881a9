"""``python -m l2p.train CONFIG.yaml [--set k=v ...]``: the entry point torchrun launches."""

import sys

from l2p.cli.train import main

sys.exit(main())
