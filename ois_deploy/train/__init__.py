"""Training on generated depth-ordered scenes: the scenes (scenes.py) and the loop (loop.py)."""
