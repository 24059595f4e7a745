"""The ``fastlm`` command.

    fastlm train [options]               train a model (no options: a tiny byte-level GPT on the
                                         Python standard library's source, minutes on a CPU);
                                         torchrun --nproc_per_node N -m fastlm train ... for many GPUs
    fastlm eval CHECKPOINT [--data ...]  loss, perplexity, bits per byte on held-out text
    fastlm generate CHECKPOINT --prompt  sample with temperature, top-k, top-p
    fastlm check [--quick]               every kernel that runs here against its float64 reference
    fastlm bench norm [...]              microbenchmarks (python -m fastlm.bench)

`fastlm COMMAND --help` lists a command's options (docs/TRAINING.md describes them).
"""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("fastlm.train.commands", "train_main"),
    "eval": ("fastlm.train.commands", "eval_main"),
    "generate": ("fastlm.train.commands", "generate_main"),
    "check": ("fastlm.check", "main"),
    "bench": ("fastlm.bench", "main"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    import importlib

    module, function = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
