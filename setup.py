"""Everything is in pyproject.toml; this only installs configs/ as the package `bertjax_configs` (pyproject's
package finder cannot map a folder to another package name next to the packages it finds)."""

from setuptools import find_namespace_packages, setup

# namespace packages too, so a subpackage without __init__.py can never drop out of the wheel
packages = find_namespace_packages(include=["bertjax", "bertjax.*"], exclude=["*.__pycache__"])
setup(packages=packages + ["bertjax_configs"], package_dir={"bertjax_configs": "configs"})
