"""wsproxy benchmark: `python -m bench --help`.

Every process binds 127.0.0.1 only; every loop is bounded in count and time.
"""
