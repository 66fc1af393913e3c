"""`python -m crowdtrain ...`: the `crowdtrain` command."""

import sys

from crowdtrain.cli.main import main

sys.exit(main())
