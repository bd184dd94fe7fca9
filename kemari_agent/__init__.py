"""Kemari: fault tolerance for virtual machines by event-tapped checkpoints."""

__version__ = "0.1.0"
