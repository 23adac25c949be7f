import sys

from capsflow.cli import main

sys.exit(main())
