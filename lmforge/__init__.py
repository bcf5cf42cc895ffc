"""lmforge: the library behind the pipeline. Knows nothing of Prefect or DVC."""

__version__ = "0.1.0"
