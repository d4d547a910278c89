import sys

from sslsky.cli import main

sys.exit(main())
