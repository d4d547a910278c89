#!/usr/bin/env python
"""Photo-z evaluation, as users of ssl-sky-surveys run it: the same as ``sslsky eval-specz``.

    python eval_specz.py --config config/eval_specz.yaml ckpt=runs/sdss/encoder.pt data.path=packed
"""

import sys

from sslsky.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-specz", *sys.argv[1:]]))
