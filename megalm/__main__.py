import sys

from megalm.cli import main

sys.exit(main())
