"""`python -m ctrscale …` (what `torchrun -m ctrscale …` runs)."""

from ctrscale.cli import main

raise SystemExit(main())
