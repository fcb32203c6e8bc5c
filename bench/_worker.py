"""Run ``worker.py`` unchanged, but with millisecond timestamps in its log lines (epoch seconds).

``python bench/_worker.py WORKER_PY ARGS...``: the benchmark needs to know when each task started and
when the worker noticed it had finished; ``worker.py``'s own log format has whole seconds only. Logging
is configured here first, so ``setup_logging``'s ``basicConfig`` in the worker is a no-op; nothing
else differs from ``python worker.py ARGS...``.
"""

from __future__ import annotations

import logging
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    script = Path(sys.argv[1]).resolve()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="@%(created).4f %(levelname)-7s %(name)s: %(message)s")
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
