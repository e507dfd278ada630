import sys

from ssfer_dist.cli import main

sys.exit(main())
