import sys

from megavictor.cli import main

sys.exit(main())
