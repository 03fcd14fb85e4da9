"""``python -m ats_vit`` (and ``torchrun -m ats_vit``) runs the ``ats-vit`` command line."""
import sys

from .jobs.cli import main

sys.exit(main())
