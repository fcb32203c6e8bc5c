"""``python -m cropchips.demo``: the local demo (``make demo``, ``cropchips demo``)."""

import sys

from cropchips.demo.run import main

sys.exit(main())
