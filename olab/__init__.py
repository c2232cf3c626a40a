"""olab: the O-Lab virtual laboratory lifecycle as Prefect flows."""

__version__ = "0.1.0"
