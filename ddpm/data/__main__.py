"""``python -m ddpm.data pack|bench ...`` (see :mod:`ddpm.data.pack`)."""

import sys

from ddpm.data.pack import main

sys.exit(main())
