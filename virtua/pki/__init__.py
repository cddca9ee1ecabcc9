"""The cluster's credentials: its CA, the certificates it issues, join tokens, revocation.

Below cluster and api (which use it), above errors; no I/O beyond its own directory.
"""
