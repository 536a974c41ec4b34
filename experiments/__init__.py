"""Experiment files: `python launch.py --config=experiments/NAME.py`."""
