"""Verifiable environments behind one small interface (base.py); `make_env` builds one by name."""
