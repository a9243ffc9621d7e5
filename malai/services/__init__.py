"""The daemon's Twisted service tree (see docs/architecture.md)."""
