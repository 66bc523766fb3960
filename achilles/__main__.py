import sys

from achilles.cli import main

sys.exit(main())
