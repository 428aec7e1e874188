import sys

from clipfold.cli import main

sys.exit(main())
