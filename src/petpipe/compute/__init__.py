"""Where the tensors live: the device and precision (device), the process group (distributed). Imports run.

Empty on purpose: a stage depends on exactly the modules it imports.
"""
