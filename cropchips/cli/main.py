"""``cropchips COMMAND [ARGS]``: the one command of an installed cropchips, one subcommand per role.

``cropchips master|worker|monitor|admin`` are the seed's ``master.py``, ``worker.py N``,
``monitor.py`` and ``admin.py`` (the same flags); ``cropchips index`` rebuilds a dataset's index
and STAC catalog from its files (``monitor --rebuild-index``); ``cropchips report`` writes its
HTML report; ``cropchips demo`` runs the whole pipeline locally on generated sample data.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from cropchips import __version__
from cropchips.cli.run import EXIT_OK, EXIT_USAGE

#: Subcommand -> (module with ``main(argv)``, arguments put first, one line of help).
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "master": ("cropchips.cli.master", (), "grid the area, find scenes, publish one task per useful cell"),
    "worker": ("cropchips.cli.worker", (), "consume tasks and write image and mask chips (worker N ...)"),
    "monitor": ("cropchips.cli.monitor", (), "follow a run's results; index the dataset when it is done"),
    "admin": ("cropchips.cli.admin", (), "topics, consumer group, results, dead letters, doctor"),
    "index": ("cropchips.cli.monitor", ("--rebuild-index",),
              "rebuild OUTPUT/index.parquet and the STAC catalog from the chips' files (--output-dir DIR)"),
    "report": ("cropchips.dataset.report.cli", (), "write OUTPUT/report.html for a dataset folder"),
    "demo": ("cropchips.demo.run", (), "run the whole pipeline locally: embedded broker, generated sample area"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cropchips COMMAND [ARGS]   (cropchips COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return EXIT_OK if args else EXIT_USAGE
    if args[0] == "--version":
        print(f"cropchips {__version__}")
        return EXIT_OK
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"cropchips: unknown command {name!r}\n{usage()}")
        return EXIT_USAGE
    module, first, _ = COMMANDS[name]
    return importlib.import_module(module).main([*first, *rest])


if __name__ == "__main__":
    sys.exit(main())
