"""``python -m layotto.host``: the node host (what the shim's start action launches)."""

import sys

from layotto.host.daemon import main

sys.exit(main())
