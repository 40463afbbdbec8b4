"""Calibration: fit LPM parameters to observed series by gradient descent through the simulation.

* :mod:`calibration.observation`: reporting model (ascertainment, delays, lags, weekly
  aggregation, citywide totals) and date alignment with masking of bad data.
* :mod:`calibration.losses`: Poisson / negative-binomial NLL, MSE on log(1 + x).
* :mod:`calibration.rollout`: chunked, checkpointed differentiable rollouts.
* :mod:`calibration.covariate_net`: covariate networks producing time-varying parameters.
* :mod:`calibration.fit`: the one loop (any torch optimizer and scheduler, CRN replicates; progress,
  checkpoint/resume, keep-best and trust region as hooks)
  and gradient-free baselines (Nelder–Mead, random search) on a simulation budget.
* :mod:`calibration.gradcheck`: autograd vs finite differences.
* :mod:`calibration.forecast`: anchored ensemble forecasts with fitted noise, stacking with a
  last-week-flat baseline, quantiles, MAE, WIS, coverage.

Imports only ``lpm`` and third-party packages.
"""

from calibration.fit import (Checkpoint, FitHook, FitResult, FitRun, KeepBest, OnStep, Problem, Progress, TrustRegion,
                             cosine_decay, fit, nelder_mead, param_groups, random_search, raw_vector, set_raw_vector)
from calibration.forecast import (QUANTILES, anchored_draws, fit_dispersion, model_weight, naive_mean, quantiles,
                                  sample_counts, scores,
                                  trend_sd, weekday_factors, wis)
from calibration.gradcheck import GradCheck, gradient_check
from calibration.losses import Loss, mse_log1p, negbin_nll, poisson_nll
from calibration.covariate_net import CovariateNet, CovariateNetParams, ParamSchedule, covariates
from calibration.observation import (DataWarning, ObservationModel, Observed, Stream, aggregation_matrix, align,
                                     convolve_delay, gamma_delay, lag_delay)
from calibration.rollout import make_streams, rollout
from calibration.validation import check_share, check_train_end, data_span, require_observed

__all__ = [
    "check_share", "check_train_end", "data_span", "require_observed",
    "Stream", "ObservationModel", "Observed", "align", "gamma_delay", "lag_delay", "convolve_delay",
    "aggregation_matrix", "DataWarning",
    "Loss", "poisson_nll", "negbin_nll", "mse_log1p",
    "rollout", "make_streams",
    "CovariateNet", "CovariateNetParams", "ParamSchedule", "covariates",
    "fit", "Problem", "FitResult", "FitRun", "FitHook", "Progress", "Checkpoint", "KeepBest", "TrustRegion", "OnStep",
    "param_groups", "cosine_decay", "nelder_mead", "random_search", "raw_vector", "set_raw_vector",
    "gradient_check", "GradCheck",
    "sample_counts", "quantiles", "wis", "scores", "QUANTILES", "fit_dispersion", "weekday_factors", "trend_sd",
    "anchored_draws", "naive_mean", "model_weight",
]
