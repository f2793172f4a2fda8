"""vmimagemanager's package is described in pyproject.toml (and setup.cfg); this file lets
the commands users of 0.3 know keep working: `python3 setup.py --version`,
`python3 setup.py sdist`."""

from setuptools import setup

setup()
