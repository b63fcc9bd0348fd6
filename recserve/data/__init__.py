"""Reading, fetching and synthesising interaction data; every loader returns :class:`RawData`."""

from recserve.data.fetch import fetch
from recserve.data.movielens import load_movielens
from recserve.data.raw import RawData
from recserve.data.synth import generate, write_ml1m

__all__ = ["RawData", "load_movielens", "generate", "write_ml1m", "fetch"]
