"""The paper's problems: objectives, data generators and closed-form references."""

from ._lasso import (
    Lasso as Lasso,
    lasso_cpusmall as lasso_cpusmall,
    lasso_data as lasso_data,
    lasso_diabetes as lasso_diabetes,
)
from ._logistic import (
    LogisticRegression as LogisticRegression,
    flip_labels as flip_labels,
    logistic_data as logistic_data,
)
from ._qp import QP as QP, random_qp as random_qp
from ._ridge import (
    WeightedRidge as WeightedRidge,
    ridge_data as ridge_data,
    ridge_lambda as ridge_lambda,
)
from ._svmlight import load_svmlight as load_svmlight, standardize as standardize

__all__: list[str] = []
__all__ += [
    "LogisticRegression",
    "WeightedRidge",
    "flip_labels",
    "load_svmlight",
    "logistic_data",
    "ridge_data",
    "ridge_lambda",
    "standardize",
]
__all__ += ["QP", "random_qp"]
__all__ += ["Lasso", "lasso_cpusmall", "lasso_data", "lasso_diabetes"]
