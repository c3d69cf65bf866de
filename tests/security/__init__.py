"""Attacks on the node host as a tenant boundary, each asserting the safe outcome."""
