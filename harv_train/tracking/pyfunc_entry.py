"""MLflow's "model from code" entry of the served image classifier (harv_train/tracking/pyfunc_model.py).

`mlflow.pyfunc.log_model(python_model=<this file>)` copies it into the model; loading the model runs
it, with the model's own copy of harv_train on sys.path, instead of unpickling an object. Not meant
to be imported otherwise.
"""

import mlflow.models

from harv_train.tracking.pyfunc_model import ImageClassifier

mlflow.models.set_model(ImageClassifier())
