"""``python -m services.config check FILE``: validate a fleet file (services/config/check.py)."""

import sys

from services.config.check import main

sys.exit(main())
