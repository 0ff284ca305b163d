"""`python -m lmrep.atlas`: see lmrep.atlas.cli."""

from lmrep.atlas.cli import main

raise SystemExit(main())
