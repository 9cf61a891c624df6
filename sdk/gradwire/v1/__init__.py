"""Stubs generated from protos/gradwire/v1 by scripts/gen_protos.py."""
