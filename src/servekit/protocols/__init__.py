"""Sans-IO protocol code: bytes or environment mappings in, a result or a precise error
out. Nothing in this package imports socket, threading, time or selectors, so each
parser can be tested from data alone and reused by any I/O layer.
"""
