"""``python -m qgalore_dist.plan``: print a model's ownership plan (see :mod:`qgalore_dist.dist.plan`)."""

from qgalore_dist.dist.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
