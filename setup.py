"""Everything is in pyproject.toml; this only installs configs/ as the package `bertjax_configs` (pyproject's
package finder cannot map a folder to another package name next to the packages it finds)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["bertjax", "bertjax.*"]) + ["bertjax_configs"],
      package_dir={"bertjax_configs": "configs"})
