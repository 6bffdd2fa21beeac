"""Media: the relay sessions of each call (issue 5); see control.py for the worker seam."""
