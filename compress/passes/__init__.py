"""Compression passes, one per file. See ``registry`` for lookup and ``base`` for the contract."""
