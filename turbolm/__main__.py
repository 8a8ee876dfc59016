import sys

from turbolm.cli import main

sys.exit(main())
