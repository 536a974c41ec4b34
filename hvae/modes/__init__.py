"""Command-line modes other than training (`launch.py --mode=eval|inpaint`), as library calls."""
