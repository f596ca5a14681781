"""The training loop and what the model stages share: model, engine, schedule, resume, lr_find, the
fine-tuning LR choice, the LR plot, runner. Imports run, compute and data.

Empty on purpose: a stage depends on exactly the modules it imports.
"""
