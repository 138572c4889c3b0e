"""fedmed's benchmarks and studies. Each is a module, run from the repository root:
``python -m experiments.<name> --help``."""
