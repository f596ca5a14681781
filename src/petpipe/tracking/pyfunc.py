"""The raw-image pyfunc of the final model, as an MLflow "model from code".

``tracking.models.log_final_models`` logs this file rather than a pickled object: MLflow copies it into
the model and runs it when the model is loaded (the logged ``petpipe`` package is on ``sys.path`` then),
so loading the model unpickles no code. No stage imports this file and no DVC output depends on it;
it shapes only what MLflow stores.
"""

from petpipe.tracking.models import ImageClassifierModel, set_model

set_model(ImageClassifierModel())
