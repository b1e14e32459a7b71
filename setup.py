"""Kept at the top level, as in the public release; the metadata is in pyproject.toml."""

from setuptools import setup

setup()
