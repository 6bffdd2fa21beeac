"""Interop tests: the real `sbc run` process driven by real SIP peers."""
