"""The served model: predictions on raw images from the final checkpoint (what the logged pyfunc runs).
Imports run, data and train.

Empty on purpose: a stage depends on exactly the modules it imports.
"""
