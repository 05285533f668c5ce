"""``python -m services.config check FILE``, the same as ``smsgw config check FILE`` (services/config/check.py)."""

import sys

from services.config.check import main

sys.exit(main())
