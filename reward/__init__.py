"""Models and functions that judge: reward models, classifiers, Python reward functions."""
