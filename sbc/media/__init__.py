"""Media: the relay sessions of each call; see control.py for the worker seam."""
