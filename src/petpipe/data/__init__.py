"""The data path: labels and their table, presize (the decoded, resized store), the store on the device,
loaders, augmentation, normalisation. Imports run and compute.

Empty on purpose: a stage depends on exactly the modules it imports.
"""
