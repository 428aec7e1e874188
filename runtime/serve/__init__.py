"""clipfold serve: the HTTP app (Open Inference Protocol v2 + the JSON API + the page), gRPC, limits and
metrics. A leaf: nothing else in runtime imports it.

app.py (open the bundles, the routes, serve()), server.py (ClipfoldServer: models, batchers, request
plumbing), models.py (the served models), inference_routes.py and inference_protocol.py (the protocol's
handlers and tensors), json_routes.py and json_query.py (the JSON API's handlers and queries),
request_work.py (decode, preprocess, embed texts, search: shared with gRPC), grpc_service.py and
grpc_tensors.py, limits.py (pixels, bodies, encodings) and connection_limits.py (HTTP connections),
config.py, metrics.py, webui.py (the page).
"""
