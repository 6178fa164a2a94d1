"""Demand predictors for prefetch and scale-to-zero, behind one interface (``base.Predictor``).

After each time bucket a predictor gets every function's arrival count and answers, per
function, whether its adapter should be resident on the device in the next bucket (prefetch or
keep) or unloaded, with a score that ranks functions when the device cannot hold all of them.
Pure: no I/O, no clock, randomness only from a seed; a predictor's state is a function of the
history it was fed, so the control plane rebuilds it after a restart by replaying the history.

- ``FixedKeepAlive``: the serverless default (keep for N buckets after the last use).
- ``AggregateRate``: the aggregate rate split by long-run shares (the no-structure control).
- ``Ewma``: per-function EWMA of the rate.
- ``HybridHistogram``: Shahrad et al. (ATC 2020), idle-time histogram with pre-warm and
  keep-alive windows and fallbacks; ``HazardHistogram`` reads the same histogram as a hazard.
- ``SeasonalNaive``: the next bucket looks like one season ago (season found per function).
- ``LstmPredictor``: a small LSTM (P-LoRA) trained online, in numpy (see ``lstm``: no torch on
  the control plane's import path).
"""

from controlplane.scheduler.predict.base import Forecast, Predictor, ThresholdPredictor
from controlplane.scheduler.predict.histogram import HazardHistogram, HybridHistogram
from controlplane.scheduler.predict.lstm import LstmPredictor
from controlplane.scheduler.predict.seasonal import SeasonalNaive
from controlplane.scheduler.predict.simple import AggregateRate, Ewma, FixedKeepAlive

__all__ = [
    "AggregateRate",
    "Ewma",
    "FixedKeepAlive",
    "Forecast",
    "HazardHistogram",
    "HybridHistogram",
    "LstmPredictor",
    "Predictor",
    "SeasonalNaive",
    "ThresholdPredictor",
]
