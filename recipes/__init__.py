"""The shipped recipes (YAML), mapped into the wheel as qbco.recipes (pyproject.toml); this file makes the folder
importable in an editable install too."""
