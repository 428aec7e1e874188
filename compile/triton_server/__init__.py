"""clipfold export triton: a Triton Inference Server model repository from a bundle.

repository.py (the export: config, checks, files), model_config.py (each model's config.pbtxt),
validate.py (the check of a written repository), python_models/ (the Python-backend models it copies in).
"""
