"""python -m fastlm.bench: see fastlm.bench.main."""

from . import main

raise SystemExit(main())
