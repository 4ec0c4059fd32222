"""`python -m audiences.cli`: the same as the `audiences` command."""

import sys

from audiences.cli import main

sys.exit(main())
