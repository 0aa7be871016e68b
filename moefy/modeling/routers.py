"""The router kinds by name: each maps x [T, D] to non-negative scores [T, E]; larger means "more needed"."""

from .router_mlp import MLPRouter
from .router_quant import QuantRouter
from .router_representative import RepresentativeRouter
from .router_similarity import SimilarityRouter
from .router_sketch import SketchRouter


ROUTERS = {"similarity": SimilarityRouter, "representative": RepresentativeRouter, "mlp": MLPRouter,
           "sketch": SketchRouter, "quant": QuantRouter}
