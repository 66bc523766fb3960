import sys

from achilles.server.main import main

sys.exit(main())
