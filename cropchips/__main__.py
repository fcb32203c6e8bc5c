"""``python -m cropchips COMMAND [ARGS]``: the same as the installed ``cropchips`` command."""

import sys

from cropchips.cli.main import main

sys.exit(main())
