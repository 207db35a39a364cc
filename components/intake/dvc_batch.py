"""Several DVC commands in one child process: ``python -m components.intake.dvc_batch COMMANDS_JSON`` (a JSON
list of argument lists), run one after another through DVC's own command line, stopping at the first that fails.

Setting up a workspace takes four or five small DVC commands (``init``, ``config``, ``remote add``,
``remote modify``); each child process spends about a second importing DVC before it does anything, so they run
in one child (:func:`components.intake.git_dvc.dvc_batch`), still outside cliploop's own process.
"""

from __future__ import annotations

import json
import sys


def run(commands: list[list[str]]) -> int:
    from dvc.cli import main

    for args in commands:
        code = main(args)
        if code:
            print(f"`dvc {' '.join(args)}` failed (exit {code})", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
