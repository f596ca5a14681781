"""MLflow tracking, the only package that imports mlflow: ``store`` (where, and whether it answers), ``runs``
(the stage run and its journal), ``links`` (lineage), ``models`` (the final model), ``replay`` (after an outage).
See docs/tracking.md. Empty on purpose: a stage depends on exactly the modules it imports.
"""
