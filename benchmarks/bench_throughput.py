"""Throughput benchmark: dense vs ATS (packed, padded). Same as `ats-vit bench`; run with --help."""
import sys

from ats_vit.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
