"""Where the dataset comes from: download, archive (extract, checks), fetch (the fetch stage's library). Imports run.

Empty on purpose: a stage depends on exactly the modules it imports.
"""
