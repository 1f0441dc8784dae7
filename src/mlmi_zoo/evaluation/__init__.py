"""Evaluation: metric kernels for the task and the five elements of interpretability, and figures."""
from mlmi_zoo.evaluation.figures import (
    plot_bland_altman,
    plot_deletion,
    plot_examples,
    plot_heatmap,
    plot_intervention_curves,
    plot_prototype_gallery,
    plot_reliability,
    plot_roc,
)
from mlmi_zoo.evaluation.evaluate import evaluate
from mlmi_zoo.evaluation.bootstrap import CI, bootstrap_ci
from mlmi_zoo.evaluation.faithfulness import (
    Curve,
    deletion_curve,
    faithfulness_gap,
    insertion_curve,
    instance_deletion_curve,
)
from mlmi_zoo.evaluation.localization import activation_precision, instance_auroc, pointing_game
from mlmi_zoo.evaluation.physical import BlandAltman, bland_altman, mae, rmse
from mlmi_zoo.evaluation.recognizability import (
    agreement,
    concept_metrics,
    inter_reader_agreement,
    model_reader_agreement,
    prototype_purity,
    unique_prototypes,
)
from mlmi_zoo.evaluation.task import expected_calibration_error, reliability_bins, task_metrics
from mlmi_zoo.evaluation.transparency import decomposition_error, explanation_size

__all__ = [
    "BlandAltman",
    "CI",
    "Curve",
    "activation_precision",
    "agreement",
    "bland_altman",
    "bootstrap_ci",
    "concept_metrics",
    "decomposition_error",
    "deletion_curve",
    "evaluate",
    "expected_calibration_error",
    "explanation_size",
    "faithfulness_gap",
    "insertion_curve",
    "instance_auroc",
    "instance_deletion_curve",
    "inter_reader_agreement",
    "mae",
    "model_reader_agreement",
    "plot_bland_altman",
    "plot_deletion",
    "plot_examples",
    "plot_heatmap",
    "plot_intervention_curves",
    "plot_prototype_gallery",
    "plot_reliability",
    "plot_roc",
    "pointing_game",
    "prototype_purity",
    "reliability_bins",
    "rmse",
    "task_metrics",
    "unique_prototypes",
]
