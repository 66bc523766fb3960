import sys

from achilles.node.main import main

sys.exit(main())
