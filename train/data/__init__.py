"""Impression tables: reading, the data contract, batches, the feed simulator.

Kept free of Lightning imports so `python -m train.data.synthetic` starts fast; the
DataModule lives in `train.data.module`.
"""

from train.data.batch import Batch
from train.data.features import DataError, FeatureSpec, featurize, hash_ids
from train.data.stats import TrainStats

__all__ = ["Batch", "DataError", "FeatureSpec", "TrainStats", "featurize", "hash_ids"]
