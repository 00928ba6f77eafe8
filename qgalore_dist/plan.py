"""``python -m qgalore_dist.plan``: print a model's ownership plan (see :mod:`qgalore_dist.parallel.plan`)."""

from qgalore_dist.parallel.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
