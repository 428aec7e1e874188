"""clipfold serve: the HTTP app (Open Inference Protocol v2 + the JSON API + the page), gRPC, limits and
metrics. A leaf: nothing else in runtime imports it.
"""
