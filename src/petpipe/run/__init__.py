"""The run machinery every stage shares: params (config, sections), errors, files, signals, the stage entry,
its clock, torchrun, warm processes, lineage. The bottom layer: it imports no other petpipe package.

Empty on purpose: a stage depends on exactly the modules it imports.
"""
