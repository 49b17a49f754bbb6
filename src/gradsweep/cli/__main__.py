"""``python -m gradsweep.cli``: the ``gradsweep`` console script."""
import sys

from gradsweep.cli.main import main

sys.exit(main())
