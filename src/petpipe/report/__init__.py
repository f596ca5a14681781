"""The report stage: the page, its build, figures, html, inputs, interpretation. Imports the layers below it.

Empty on purpose: a stage depends on exactly the modules it imports.
"""
