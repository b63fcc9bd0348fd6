"""Client for the served recommender: ``RecClient(...).recommend(user_id, k)`` over gRPC or HTTP."""

from recserve.client.client import RecClient, Recommendation, RecommendedItem

__all__ = ["RecClient", "Recommendation", "RecommendedItem"]
