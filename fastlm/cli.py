"""The ``fastlm`` command.

    fastlm check [--quick]     every kernel that runs here against its float64 reference
    fastlm bench norm [...]    microbenchmarks (python -m fastlm.bench)
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"check": "fastlm.check", "bench": "fastlm.bench"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
